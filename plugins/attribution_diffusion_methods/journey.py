"""journey-TRAK's query function ``journey-loss`` (Georgiev et al. 2023, "The journey, not the
destination: how data guides diffusion models").

At sampling step ``t`` of a query's stored trajectory (``x_T, …, x_0``; ``x_t`` is state
``T − t``) the model's prediction of the final image is

    x̂₀ᵗ = (x_t − √(1 − ᾱ_t) ε_θ(x_t, t)) / √ᾱ_t,

held fixed (data, not differentiated), re-noised with fresh ``ε`` and scored by the timestep-t
loss::

    journey-loss_t(θ, x') = E_ε ‖ε − ε_θ(√ᾱ_t x̂₀ᵗ + √(1 − ᾱ_t) ε, t)‖²   (summed over pixels).

One attribution per step: the option ``step`` picks ``t`` (default ``⌊T/2⌋``, the middle of the
trajectory). A function only (``is_target = False``): the LDS harness evaluates the scores it
produces against the suite's own target.
"""

from __future__ import annotations

from typing import Any

import torch
from attribution_diffusion.schedule import Schedule
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attribution_core import Batch, ConfigError, DataError, Forward, Measurement, Task

DIFFUSION_ONLY = (
    "journey-trak and das apply to diffusion tasks only (ddpm-digits, ddpm-diffusers: a noise "
    "schedule and sampled queries); on a supervised task use trak, kfac-influence or grad-dot"
)


class JourneyLossOptions(BaseModel):
    """Options of ``journey-loss``."""

    model_config = ConfigDict(extra="forbid")
    step: int | None = Field(
        None,
        ge=1,
        description="Sampling step t (1..T) whose x̂₀ prediction is scored; None = ⌊T/2⌋.",
    )
    n_samples: int | None = Field(
        None, ge=1, description="Fresh ε draws per query (None = the task's n_samples)."
    )


def diffusion_schedule(task: Task, name: str) -> tuple[Schedule, int]:
    """``(schedule, default n_samples)`` of a diffusion task; ConfigError naming why otherwise."""
    schedule = getattr(task, "schedule", None)
    if not isinstance(schedule, Schedule):
        raise ConfigError(
            f"measurement {name!r}: task {task.name!r} has no diffusion noise schedule; "
            f"{DIFFUSION_ONLY}"
        )
    return schedule, int(getattr(task, "n_samples", 1))


class JourneyLoss(Measurement):
    """``E_ε ‖ε − ε_θ(√ᾱ_t x̂₀ᵗ + √(1 − ᾱ_t) ε, t)‖²`` at one sampling step (module docstring)."""

    name = "journey-loss"
    is_target = False

    def __init__(self, schedule: Schedule, step: int, n_samples: int) -> None:
        self.schedule = schedule
        self.step = int(step)
        self.n_samples = int(n_samples)

    def draw(self, batch: Batch, generator: torch.Generator) -> Batch:
        """``{"eps": (B, S, C, H, W)}`` fresh noise for the re-noised x̂₀ (CPU)."""
        x = batch["x"]
        shape = (x.shape[0], self.n_samples, *x.shape[1:])
        return {"eps": torch.randn(shape, generator=generator, dtype=x.dtype)}

    def state(self, batch: Batch) -> Tensor:
        """``x_t: (B, C, H, W)``, state ``T − t`` of the stored trajectory (checked)."""
        T = self.schedule.T
        traj = batch.get("trajectory")
        if traj is None:
            raise DataError(
                "journey-loss: the queries have no 'trajectory' (B, T+1, C, H, W); generate "
                "them with `queries: {source: generated}` and the task's `sampler: ddpm`"
            )
        if traj.ndim < 3 or traj.shape[1] != T + 1:
            raise DataError(
                f"journey-loss: trajectory mismatch: expected {T + 1} states x_T..x_0 (T = {T}), "
                f"got shape {tuple(traj.shape)}; sample the queries with this task's T"
            )
        return traj[:, T - self.step]

    def predicted_x0(self, forward: Forward, batch: Batch) -> Tensor:
        """``x̂₀ᵗ: (B, C, H, W)``, detached (the prediction is data, not differentiated)."""
        x_t = self.state(batch)
        t = torch.full((x_t.shape[0],), self.step, dtype=torch.int64, device=x_t.device)
        return self.schedule.predict_x0(x_t, t, forward(x_t, t)).detach()

    def evaluate(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """``(B,)``: mean over the ε draws of the re-noised x̂₀'s squared ε-error at step t."""
        x0 = self.predicted_x0(forward, batch)
        eps = noise["eps"]
        b, s = eps.shape[:2]
        t = torch.full((b, s), self.step, dtype=torch.int64, device=x0.device)
        x_t = self.schedule.noised(x0[:, None], t, eps)
        pred = forward(x_t.reshape(b * s, *x0.shape[1:]), t.reshape(b * s))
        sq = (eps - pred.reshape(eps.shape)).pow(2).flatten(2).sum(dim=2)
        return sq.mean(dim=1)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "step": self.step,
            "n_samples": self.n_samples,
            "T": self.schedule.T,
        }


def journey_loss_factory(
    task: Task, step: int | None = None, n_samples: int | None = None
) -> JourneyLoss:
    """``journey-loss`` at ``step`` (None: ⌊T/2⌋); ConfigError unless 1 ≤ step ≤ T."""
    schedule, default_n = diffusion_schedule(task, "journey-loss")
    t = max(1, schedule.T // 2) if step is None else step
    if not 1 <= t <= schedule.T:
        raise ConfigError(
            f"journey-loss.step: step {t} is outside [1, {schedule.T}] (sampling steps are "
            f"1..T, T = {schedule.T}); pick a step in that range"
        )
    return JourneyLoss(schedule, t, n_samples or default_n)


journey_loss_factory.is_target = False  # type: ignore[attr-defined]
