"""Samplers: ancestral DDPM (σ_t² = β̃_t, the paper's "small" variance) and deterministic DDIM.

Every random number comes from a CPU generator seeded by ``seed``: the same seed gives the
same bits on CPU. No clipping of predictions, so the sampler is exactly the ``p_θ`` whose
densities ``trajectory-nll`` sums (with σ_1² = β̃_1 = 0 the last step returns μ_θ(x_1, 1)).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attribution_diffusion.schedule import Schedule


@torch.no_grad()
def sample_ddpm(
    model: nn.Module,
    schedule: Schedule,
    n: int,
    shape: tuple[int, ...],
    seed: int,
    *,
    trajectory: bool = False,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor | None]:
    """Ancestral sampling ``x_{t−1} = μ_θ(x_t, t) + σ_t z``, t = T..1.

    Args:
        model: ``ε_θ(x_t, t)``.
        schedule: the noise schedule (its dtype/device are used).
        n: number of samples.
        shape: ``(C, H, W)``.
        seed: seeds the generator of ``x_T`` and of every ``z``.
        trajectory: also return the states.
        batch_size: rows per network call (draws do not depend on it).

    Returns:
        ``(x_0: (n, C, H, W), trajectory: (n, T+1, C, H, W) ordered x_T..x_0 or None)``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    dtype, device = schedule.beta.dtype, schedule.beta.device
    T = schedule.T
    x = torch.randn((n, *shape), generator=gen, dtype=dtype).to(device)
    states = [x] if trajectory else None
    sigma = schedule.beta_tilde.sqrt()
    for t in range(T, 0, -1):
        z = torch.randn((n, *shape), generator=gen, dtype=dtype).to(device)
        tt = torch.full((n,), t, dtype=torch.int64, device=device)
        eps = _batched(model, x, tt, batch_size)
        x = schedule.posterior_mean(x, tt, eps) + sigma[t] * z
        if states is not None:
            states.append(x)
    traj = torch.stack(states, dim=1) if states is not None else None
    return x, traj


@torch.no_grad()
def sample_ddim(
    model: nn.Module,
    schedule: Schedule,
    n: int,
    shape: tuple[int, ...],
    seed: int,
    *,
    steps: int = 50,
    trajectory: bool = False,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor | None]:
    """Deterministic DDIM (η = 0) on ``steps`` evenly spaced timesteps from T down to 1.

    Returns:
        ``(x_0: (n, C, H, W), trajectory: (n, steps+1, C, H, W) or None)``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    dtype, device = schedule.beta.dtype, schedule.beta.device
    T = schedule.T
    ts = torch.linspace(T, 1, min(steps, T)).round().to(torch.int64).unique_consecutive().tolist()
    x = torch.randn((n, *shape), generator=gen, dtype=dtype).to(device)
    states = [x] if trajectory else None
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else 0
        tt = torch.full((n,), t, dtype=torch.int64, device=device)
        eps = _batched(model, x, tt, batch_size)
        ab, ab_prev = schedule.alpha_bar[t], schedule.alpha_bar[t_prev]
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        if states is not None:
            states.append(x)
    traj = torch.stack(states, dim=1) if states is not None else None
    return x, traj


def _batched(model: nn.Module, x: Tensor, t: Tensor, batch_size: int) -> Tensor:
    if x.shape[0] <= batch_size:
        return model(x, t)
    return torch.cat(
        [
            model(x[i : i + batch_size], t[i : i + batch_size])
            for i in range(0, x.shape[0], batch_size)
        ]
    )
