"""The generic ``loss`` measurement: whatever the task trains on, ``task.training_loss()``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from attribution_core.interfaces import Measurement, Task


class TrainingLossOptions(BaseModel):
    """Options of ``loss``."""

    model_config = ConfigDict(extra="forbid")
    n_samples: int | None = Field(
        None, ge=1, description="Monte-Carlo draws per example (None = the task's default)."
    )


def TrainingLoss(task: Task, n_samples: int | None = None) -> Measurement:  # noqa: N802
    """``ℓ(θ, x)`` of ``task`` (diffusion: ε-loss; regression: squared error; ...)."""
    return task.training_loss(n_samples=n_samples)


TrainingLoss.is_target = True  # type: ignore[attr-defined]
