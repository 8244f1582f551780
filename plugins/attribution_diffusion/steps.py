"""The training-step hook of ``ddpm-digits`` (:meth:`attribution_core.Task.train_step`).

The same run as :func:`attribution_diffusion.training.train` on all of D, one pure step at a
time: step ``k``'s draws are what ``train``'s generator (seeded by the seed) gives at step
``k`` when every weight is positive — ``B`` indices uniform over all N, then ``t ~ U{1..T}``,
then ``ε ~ N(0, I)`` in the task's dtype — and the loss is ``mean_b w_{i_b} ‖ε_b − ε_θ(x_t, t)‖²``
(the denominator is ``B`` whatever the weights). With every weight 1, replaying the hook equals
``train(build_model(seed), ones, seed)`` bit for bit (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from attribution_core import Params, StepBatch, TrainingRecipe
from attribution_diffusion.schedule import Schedule
from attribution_diffusion.training import TrainConfig


def recipe(cfg: TrainConfig) -> TrainingRecipe:
    """``train``'s optimiser (Adam or SGD, ``eps``, warm-up) for ``train_steps`` steps (the base
    model's count), EMA when configured."""
    return TrainingRecipe(
        steps=cfg.train_steps,
        batch_size=cfg.batch_size,
        optimizer=cfg.optimizer_config(),
        ema_decay=cfg.ema_decay if cfg.ema else None,
    )


def draw(gen: torch.Generator, n: int, x: Tensor, T: int, batch_size: int) -> StepBatch:
    """One step's draws from ``gen``, in ``train``'s order: indices, ``t``, ``ε``.

    Returns:
        ``StepBatch(indices: (B,), noise={"t": (B,) in 1..T, "eps": (B, C, H, W)})`` on CPU.
    """
    idx = torch.randint(n, (batch_size,), generator=gen)
    t = torch.randint(1, T + 1, (batch_size,), generator=gen)
    eps = torch.randn((batch_size, *x.shape[1:]), generator=gen, dtype=x.dtype)
    return StepBatch(indices=idx, noise={"t": t, "eps": eps})


def step_loss(
    module: nn.Module,
    schedule: Schedule,
    x: Tensor,
    params: Params,
    batch: StepBatch,
    weights: Tensor,
) -> Tensor:
    """``mean_b w_{i_b} ‖ε_b − ε_θ(√ᾱ_t x_{i_b} + √(1 − ᾱ_t) ε_b, t_b)‖²`` (summed over pixels).

    Args:
        module: a U-Net of the task's architecture (its parameters are replaced by ``params``).
        schedule: the noise schedule.
        x: ``(N, C, H, W)`` training images.
        params: ``θ`` by name.
        batch: the step's draws (:func:`draw`).
        weights: ``(N,)`` per-example weights (differentiable).
    """
    dev = x.device
    idx = batch.indices.to(dev)
    t, eps = batch.noise["t"].to(dev), batch.noise["eps"].to(dev)
    w = weights.to(dev, x.dtype)[idx]
    pred = functional_call(module, dict(params), (schedule.noised(x[idx], t, eps), t))
    return (w * (eps - pred).pow(2).flatten(-3).sum(-1)).mean(-1)
