"""The linear β schedule of DDPM, indexed by timesteps ``t = 1..T`` (index 0 is ``t = 0``).

All tensors have length ``T + 1`` so that ``schedule.beta[t]`` is ``β_t`` for ``t`` in 1..T:

* ``beta[t]`` = β_t (linear from ``beta_start`` to ``beta_end``), ``beta[0] = 0``
* ``alpha[t]`` = α_t = 1 − β_t
* ``alpha_bar[t]`` = ᾱ_t = Π_{s≤t} α_s, ``alpha_bar[0] = 1``
* ``beta_tilde[t]`` = β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t (so β̃_1 = 0): the sampler's σ_t²
* ``elbo_weight[t]`` = w_t = β_t² / (2 σ_t² α_t (1 − ᾱ_t)) for t ≥ 2 and ``1/(2 α_1)`` at t = 1
  (the L_0 term, see ``docs/diffusion.md``)

Computed in float64 and cast to the requested dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Schedule:
    """Noise schedule tensors of length ``T + 1`` (see module docstring)."""

    T: int
    beta: Tensor
    alpha: Tensor
    alpha_bar: Tensor
    beta_tilde: Tensor
    elbo_weight: Tensor

    @classmethod
    def linear(
        cls,
        T: int,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Schedule:
        """Linear β_t from ``beta_start`` (t = 1) to ``beta_end`` (t = T)."""
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls.from_betas(betas, dtype, device)

    @classmethod
    def from_betas(
        cls, betas: Tensor, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> Schedule:
        """Any schedule from ``betas: (T,)`` = (β_1..β_T) (e.g. a diffusers scheduler's ``betas``)."""
        T = int(betas.shape[0])
        beta = torch.zeros(T + 1, dtype=torch.float64)
        beta[1:] = betas.detach().to("cpu", torch.float64)
        alpha = 1.0 - beta
        alpha_bar = torch.cumprod(alpha, dim=0)
        beta_tilde = torch.zeros_like(beta)
        beta_tilde[2:] = (1.0 - alpha_bar[1:-1]) / (1.0 - alpha_bar[2:]) * beta[2:]
        weight = torch.zeros_like(beta)
        weight[1] = 1.0 / (2.0 * alpha[1])
        if T >= 2:
            weight[2:] = beta[2:] ** 2 / (2.0 * beta_tilde[2:] * alpha[2:] * (1.0 - alpha_bar[2:]))

        def cast(x: Tensor) -> Tensor:
            return x.to(dtype=dtype, device=device)

        return cls(T, cast(beta), cast(alpha), cast(alpha_bar), cast(beta_tilde), cast(weight))

    def l0_constant(self, dim: int) -> float:
        """``(D/2) log(2π β_1)``: the θ-independent part of ``L_0`` for ``D`` pixels (nats)."""
        return 0.5 * dim * math.log(2.0 * math.pi * float(self.beta[1]))

    def noised(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε``; ``t`` broadcasts against the leading dims of ``x0``."""
        ab = self.alpha_bar[t].to(x0.dtype)
        ab = ab.reshape(*ab.shape, *([1] * (x0.ndim - ab.ndim)))
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps

    def predict_x0(self, x_t: Tensor, t: Tensor, eps_pred: Tensor) -> Tensor:
        """``x̂₀ = (x_t − √(1 − ᾱ_t) ε_θ(x_t, t)) / √ᾱ_t``: the clean image predicted at step t."""
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        ab = self.alpha_bar[t].to(x_t.dtype).reshape(shape)
        return (x_t - (1.0 - ab).sqrt() * eps_pred) / ab.sqrt()

    def posterior_mean(self, x_t: Tensor, t: Tensor, eps_pred: Tensor) -> Tensor:
        """``μ_θ(x_t, t) = (x_t − β_t/√(1 − ᾱ_t) ε_θ) / √α_t``."""
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        b = self.beta[t].to(x_t.dtype).reshape(shape)
        a = self.alpha[t].to(x_t.dtype).reshape(shape)
        ab = self.alpha_bar[t].to(x_t.dtype).reshape(shape)
        return (x_t - b / (1.0 - ab).sqrt() * eps_pred) / a.sqrt()
