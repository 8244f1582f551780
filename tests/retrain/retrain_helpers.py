"""Test doubles for crashes: a linear-regression task that counts its trainings, an executor that dies."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from attribution_supervised.linear_regression import LinearRegressionTask

from attribution_core import Executor
from attribution_core.builtin.executors import LocalExecutor


class CountingLinearRegression(LinearRegressionTask):
    """The real ``linear-regression`` task; ``train_calls`` counts models trained."""

    train_calls = 0

    def train(self, model, weights, seed):
        type(self).train_calls += 1
        return super().train(model, weights, seed)


class SimulatedCrashError(RuntimeError):
    """Raised by :class:`CrashAfter` to simulate a process killed between models."""


class CrashAfter(Executor):
    """The local executor, but the process "dies" when job ``k + 1`` starts (after ``k`` jobs)."""

    name = "crash-after"

    def __init__(self, k: int) -> None:
        self.k = k

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        desc: str = "",
        progress: bool = False,
    ) -> Iterator[tuple[int, Any]]:
        started = 0

        def job(item: Any) -> Any:
            nonlocal started
            if started == self.k:
                raise SimulatedCrashError(f"killed after {self.k} jobs")
            started += 1
            return fn(item)

        yield from LocalExecutor().map(job, items)


def scorer_for(options: dict, seed: int = 0, task=None):
    """An ``exact-retraining`` scorer resolved and built through the registry with ``options``.

    The scorer retrains whatever task it is given at ``scores``; ``task`` (default: a
    linear-regression task) only binds the method's measurements when it is built.
    """
    from attribution_retrain.scorer import ExactRetrainingScorer

    from attribution_core import get_registry
    from attribution_core.testing import build_scorer

    task = task or get_registry().create("task", "linear-regression", n_train=8, dim=2)
    scorer = build_scorer({"name": "exact-retraining", **options}, task, seed=seed)
    assert isinstance(scorer, ExactRetrainingScorer)
    return scorer
