"""Supervised measurements: ``mse``, ``cross-entropy``, ``margin`` (all loss-oriented).

Batches carry ``x: (B, d)`` and ``y``: ``(B,)`` float targets (regression) or int64 labels.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from attribution_core import Batch, ConfigError, Forward, Measurement, Task


class NoOptions(BaseModel):
    """No options."""

    model_config = ConfigDict(extra="forbid")


class SquaredError(Measurement):
    """``(y − f(x))²`` summed over output dimensions: ``(B,)``."""

    name = "mse"

    def evaluate(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """Squared error per example."""
        pred = forward(batch["x"]).reshape(batch["y"].shape[0], -1)
        return ((batch["y"].reshape(pred.shape[0], -1) - pred) ** 2).sum(dim=1)


class CrossEntropy(Measurement):
    """``−log softmax(f(x))_y``: ``(B,)``."""

    name = "cross-entropy"

    def evaluate(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """Cross-entropy per example."""
        logits = forward(batch["x"])
        return -logits.log_softmax(dim=1).gather(1, batch["y"].long().unsqueeze(1)).squeeze(1)


class NegativeMargin(Measurement):
    """``−(f(x)_y − max_{k≠y} f(x)_k)`` — negated so lower = more confident (loss-oriented)."""

    name = "margin"

    def evaluate(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """Negated logit margin per example."""
        logits = forward(batch["x"])
        y = batch["y"].long().unsqueeze(1)
        correct = logits.gather(1, y).squeeze(1)
        others = logits.scatter(1, y, float("-inf")).amax(dim=1)
        return others - correct


def _checked(cls: type[Measurement], kinds: tuple[str, ...]):
    def factory(task: Task) -> Measurement:
        if getattr(task, "supervised_kind", None) not in kinds:
            raise ConfigError(
                f"measurement {cls.name!r} needs a {' or '.join(kinds)} task; task {task.name!r} "
                f"is not one"
            )
        return cls()

    factory.is_target = True  # type: ignore[attr-defined]
    return factory


mse_factory = _checked(SquaredError, ("regression",))
cross_entropy_factory = _checked(CrossEntropy, ("classification",))
margin_factory = _checked(NegativeMargin, ("classification",))
