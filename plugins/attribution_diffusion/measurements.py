"""Diffusion measurements (formulas in ``docs/diffusion.md``; all in nats or summed squared pixels).

Targets (loss-oriented): ``loss`` (via :meth:`DDPMTask.training_loss`), ``timestep-loss``,
``neg-elbo``, ``trajectory-nll``. Functions only (D-TRAK's substitutions, ``is_target = False``):
``square-norm`` ``‖ε_θ(x_t,t)‖²``, ``l1-norm`` ``‖ε_θ(x_t,t)‖₁``, ``l2-norm`` ``‖ε_θ(x_t,t)‖₂``.

Noise is drawn by :meth:`draw` as ``{"t": (B, S) int64, "eps": (B, S, C, H, W)}`` on CPU and
consumed by :meth:`evaluate`, which calls the network once on the flattened ``(B·S)`` rows and
averages the per-draw values (:meth:`per_draw`, ``(B, S)``) over draws. With
``timesteps: all`` each of the ``n_samples`` draws enumerates every ``t = 1..T`` (``S = n·T``
rows; stratified, exact in ``t``), which gives the same estimators' expectation.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attribution_core import Batch, ConfigError, DataError, Forward, Measurement, Task
from attribution_diffusion.schedule import Schedule

Timesteps = Literal["uniform", "all"]


class EpsOptions(BaseModel):
    """Options shared by the (t, ε) Monte-Carlo measurements."""

    model_config = ConfigDict(extra="forbid")
    n_samples: int | None = Field(
        None, ge=1, description="Draws of (t, ε) per example (None = the task's n_samples)."
    )
    timesteps: Timesteps = Field(
        "uniform", description="uniform: t ~ U{1..T} per draw; all: every draw enumerates t = 1..T."
    )


class TimestepLossOptions(BaseModel):
    """Options of ``timestep-loss``."""

    model_config = ConfigDict(extra="forbid")
    t: int = Field(description="The timestep, 1..T.")
    n_samples: int | None = Field(None, ge=1, description="ε draws (None = the task's n_samples).")


class TrajectoryOptions(BaseModel):
    """Options of ``trajectory-nll``."""

    model_config = ConfigDict(extra="forbid")
    n_samples: int | None = Field(
        None, ge=1, description="None: exact sum over all T steps; k: MC over k uniform steps."
    )


class EpsMeasurement(Measurement):
    """Base of the (t, ε) measurements: ``x_t = √ᾱ_t x + √(1−ᾱ_t) ε``, one forward on B·S rows."""

    name = "loss"

    def __init__(
        self,
        schedule: Schedule,
        n_samples: int,
        timesteps: Timesteps = "uniform",
        t: int | None = None,
    ) -> None:
        self.schedule = schedule
        self.n_samples = int(n_samples)
        self.timesteps = timesteps
        self.t = t

    def draw(self, batch: Batch, generator: torch.Generator) -> Batch:
        """``{"t": (B, S) int64, "eps": (B, S, C, H, W)}`` (CPU, the batch's dtype)."""
        x = batch["x"]
        b, T = x.shape[0], self.schedule.T
        if self.t is not None:
            t = torch.full((b, self.n_samples), self.t, dtype=torch.int64)
        elif self.timesteps == "all":
            t = torch.arange(1, T + 1, dtype=torch.int64).repeat(self.n_samples).expand(b, -1)
            t = t.contiguous()
        else:
            t = torch.randint(1, T + 1, (b, self.n_samples), generator=generator)
        eps = torch.randn((*t.shape, *x.shape[1:]), generator=generator, dtype=x.dtype)
        return {"t": t, "eps": eps}

    def predict(
        self, forward: Forward, batch: Batch, noise: Batch
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(t: (B, S), ε: (B, S, C, H, W), ε_θ(x_t, t): (B, S, C, H, W))``."""
        x0, t, eps = batch["x"], noise["t"], noise["eps"]
        b, s = t.shape
        x_t = self.schedule.noised(x0[:, None], t, eps)
        pred = forward(x_t.reshape(b * s, *x0.shape[1:]), t.reshape(b * s))
        return t, eps, pred.reshape(b, s, *x0.shape[1:])

    def per_draw(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """``(B, S)``: ``‖ε − ε_θ(x_t, t)‖²`` summed over pixels, per draw."""
        _, eps, pred = self.predict(forward, batch, noise)
        return (eps - pred).pow(2).flatten(2).sum(dim=2)

    def evaluate(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """``(B,)``: mean of :meth:`per_draw` over the draws."""
        return self.per_draw(forward, batch, noise).mean(dim=1)

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "n_samples": self.n_samples, "T": self.schedule.T}
        if self.t is not None:
            out["t"] = self.t
        else:
            out["timesteps"] = self.timesteps
        return out


class EpsLoss(EpsMeasurement):
    """``ℓ(θ, x) = E_{t,ε} ‖ε − ε_θ(x_t, t)‖²`` (paper eq. 2), t uniform on 1..T."""

    name = "loss"


class TimestepLoss(EpsMeasurement):
    """``ℓ_t(θ, x) = E_ε ‖ε − ε_θ(x_t, t)‖²`` at a fixed t."""

    name = "timestep-loss"


class NegELBO(EpsMeasurement):
    """``−ELBO = Σ_{t≥2} w_t ℓ_t + ℓ_1/(2α_1) + (D/2)log(2πβ_1)`` in nats per image.

    Estimated as the mean over draws of ``T · w'_t ‖ε − ε_θ(x_t, t)‖² + const`` with
    ``w'_t`` = ``schedule.elbo_weight[t]``.
    """

    name = "neg-elbo"

    def per_draw(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """``(B, S)``: ``T · w'_t · ‖ε − ε_θ‖² + (D/2) log(2πβ_1)``."""
        t, eps, pred = self.predict(forward, batch, noise)
        sq = (eps - pred).pow(2).flatten(2).sum(dim=2)
        w = self.schedule.elbo_weight[t].to(sq.dtype)
        dim = math.prod(batch["x"].shape[1:])
        return self.schedule.T * w * sq + self.schedule.l0_constant(dim)


class SquareNorm(EpsMeasurement):
    """``‖ε_θ(x_t, t)‖²`` (D-TRAK's best substitution; a function, never a target)."""

    name = "square-norm"

    def per_draw(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """``(B, S)``: squared norm of the network output."""
        _, _, pred = self.predict(forward, batch, noise)
        return pred.pow(2).flatten(2).sum(dim=2)


class L1Norm(EpsMeasurement):
    """``‖ε_θ(x_t, t)‖₁`` (a function, never a target)."""

    name = "l1-norm"

    def per_draw(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """``(B, S)``: L1 norm of the network output."""
        _, _, pred = self.predict(forward, batch, noise)
        return pred.abs().flatten(2).sum(dim=2)


class L2Norm(EpsMeasurement):
    """``‖ε_θ(x_t, t)‖₂`` (a function, never a target)."""

    name = "l2-norm"

    def per_draw(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """``(B, S)``: Euclidean norm of the network output."""
        _, _, pred = self.predict(forward, batch, noise)
        return pred.pow(2).flatten(2).sum(dim=2).sqrt()


class TrajectoryNLL(Measurement):
    """``−log p_θ(x_{0:T}) = −log N(x_T; 0, I) − Σ_{t=1}^T log N(x_{t−1}; μ_θ(x_t, t), σ_t² I)``.

    ``σ_t² = β̃_t`` for t ≥ 2 and ``σ_1² = β_1`` (so every term is finite); nats per image. The
    batch carries ``trajectory: (B, T+1, C, H, W)`` ordered x_T, …, x_0. ``n_samples = k`` replaces
    the sum over t by ``T ×`` the mean over k uniform timesteps (unbiased; less memory).
    """

    name = "trajectory-nll"

    def __init__(self, schedule: Schedule, n_samples: int | None = None) -> None:
        self.schedule = schedule
        self.exact = n_samples is None
        self.n_samples = schedule.T if n_samples is None else int(n_samples)
        var = schedule.beta_tilde.clone()
        var[1] = schedule.beta[1]
        self.var = var

    def draw(self, batch: Batch, generator: torch.Generator) -> Batch:
        """``{}`` when exact; else ``{"t": (B, k)}`` uniform timesteps."""
        if self.exact:
            return {}
        b = next(iter(batch.values())).shape[0]
        return {
            "t": torch.randint(1, self.schedule.T + 1, (b, self.n_samples), generator=generator)
        }

    def evaluate(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """``(B,)`` negative log-density of the trajectory in nats."""
        T = self.schedule.T
        if "trajectory" not in batch:
            raise DataError(
                "trajectory-nll: the queries have no 'trajectory' (B, T+1, C, H, W); generate "
                "them with sampler: ddpm, or use target loss/neg-elbo"
            )
        traj = batch["trajectory"]
        if traj.ndim < 3 or traj.shape[1] != T + 1:
            raise DataError(
                f"trajectory-nll: trajectory mismatch: expected {T + 1} states x_T..x_0 (T = {T}), "
                f"got shape {tuple(traj.shape)}; sample the queries with this task's T"
            )
        b, img = traj.shape[0], traj.shape[2:]
        dim = math.prod(img)
        if self.exact:
            t = torch.arange(T, 0, -1, device=traj.device).expand(b, T)
            x_t, x_prev = traj[:, :T], traj[:, 1:]
        else:
            t = noise["t"]
            idx = (T - t).reshape(b, -1, *([1] * len(img))).expand(-1, -1, *img)
            x_t = traj.gather(1, idx)
            x_prev = traj.gather(1, idx + 1)
        s = t.shape[1]
        pred = forward(x_t.reshape(b * s, *img), t.reshape(b * s))
        mu = self.schedule.posterior_mean(x_t.reshape(b * s, *img), t.reshape(b * s), pred)
        var = self.var[t].to(traj.dtype)  # (B, S)
        sq = (x_prev.reshape(b * s, *img) - mu).pow(2).flatten(1).sum(dim=1).reshape(b, s)
        terms = sq / (2.0 * var) + 0.5 * dim * torch.log(2.0 * math.pi * var)
        steps = terms.sum(dim=1) if self.exact else T * terms.mean(dim=1)
        x_T = traj[:, 0].flatten(1)
        prior = 0.5 * x_T.pow(2).sum(dim=1) + 0.5 * dim * math.log(2.0 * math.pi)
        return steps + prior

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "T": self.schedule.T,
            "exact": self.exact,
            "n_samples": self.n_samples,
        }


# ---- factories ---------------------------------------------------------------------------------
def _ddpm(task: Task, name: str):
    schedule = getattr(task, "schedule", None)
    if not isinstance(schedule, Schedule):
        raise ConfigError(
            f"measurement {name!r} needs a diffusion task (ddpm-digits); task {task.name!r} is not one"
        )
    return schedule, task.n_samples  # type: ignore[attr-defined]


def _eps_factory(cls: type[EpsMeasurement], is_target: bool):
    def factory(task: Task, n_samples: int | None = None, timesteps: Timesteps = "uniform"):
        schedule, default_n = _ddpm(task, cls.name)
        return cls(schedule, n_samples or default_n, timesteps)

    factory.is_target = is_target  # type: ignore[attr-defined]
    factory.__doc__ = cls.__doc__
    return factory


neg_elbo_factory = _eps_factory(NegELBO, True)
square_norm_factory = _eps_factory(SquareNorm, False)
l1_norm_factory = _eps_factory(L1Norm, False)
l2_norm_factory = _eps_factory(L2Norm, False)


def timestep_loss_factory(task: Task, t: int, n_samples: int | None = None) -> TimestepLoss:
    """``timestep-loss`` at ``t`` (ConfigError unless 1 ≤ t ≤ T)."""
    schedule, default_n = _ddpm(task, "timestep-loss")
    if not 1 <= t <= schedule.T:
        raise ConfigError(
            f"timestep-loss.t: timestep {t} is outside [1, {schedule.T}] (timesteps are 1..T, T = "
            f"{schedule.T}); pick t in that range"
        )
    return TimestepLoss(schedule, n_samples or default_n, t=t)


def trajectory_nll_factory(task: Task, n_samples: int | None = None) -> TrajectoryNLL:
    """``trajectory-nll`` of the task's sampler."""
    schedule, _ = _ddpm(task, "trajectory-nll")
    return TrajectoryNLL(schedule, n_samples)


timestep_loss_factory.is_target = True  # type: ignore[attr-defined]
trajectory_nll_factory.is_target = True  # type: ignore[attr-defined]
