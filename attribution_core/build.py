"""Build a resolved :class:`~attribution_core.methods.MethodSpec` into a read-only ``Method``.

Building happens once per method and run, after the task exists (measurements are
task-specific). Every component is a fresh object: two methods — or two members of an
ensemble — never share a Hessian or a compressor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from attribution_core.config import MeasurementConfig
from attribution_core.ensemble import EnsembleScorer
from attribution_core.records import MethodParts, Phase, PlanSizes

if TYPE_CHECKING:
    from attribution_core.interfaces import Measurement, Scorer, Task
    from attribution_core.methods import MethodSpec
    from attribution_core.registry import Registry


@dataclass(frozen=True)
class Method:
    """A built method: its spec, its components and its scorer (read-only).

    Attributes:
        spec: the resolved entry (names, options, seed).
        parts: the built components the scorer composes (label, seed, functions, Hessian,
            compressor).
        scorer: computes ``(n_train, n_query)`` scores and predicts subsets.
    """

    spec: MethodSpec
    parts: MethodParts
    scorer: Scorer

    @property
    def label(self) -> str:
        """The method's label."""
        return self.spec.label

    @property
    def seed(self) -> int:
        """The method's seed (held once, in the spec)."""
        return self.spec.seed

    def plan(self, sizes: PlanSizes) -> list[Phase]:
        """The phases the scorer would run for ``sizes`` (nothing is computed)."""
        return self.scorer.plan(sizes)


def build_measurement(
    registry: Registry, task: Task, ref: MeasurementConfig, where: str
) -> Measurement:
    """Instantiate a measurement for ``task``."""
    return registry.create("measurement", ref.name, task, where=where, **ref.options)


def build_method(spec: MethodSpec, registry: Registry, task: Task, *, where: str = "") -> Method:
    """Build every component of ``spec`` for ``task`` and its scorer.

    With ``spec.ensemble_models`` the scorer is an :class:`EnsembleScorer` whose members are
    built (each with fresh components) by this same function from ``spec.member(m)``.
    """
    where = where or f"method {spec.label!r}"
    parts = MethodParts(
        label=spec.label,
        seed=spec.seed,
        train_function=build_measurement(
            registry, task, spec.train_function, f"{where}.train_function"
        ),
        query_function=None
        if spec.query_function is None
        else build_measurement(registry, task, spec.query_function, f"{where}.query_function"),
        hessian=None
        if spec.hessian is None
        else registry.create("hessian", spec.hessian.name, where=where, **spec.hessian.options),
        compressor=None
        if spec.compressor is None
        else registry.create(
            "compressor", spec.compressor.name, where=where, **spec.compressor.options
        ),
    )
    if spec.ensemble_models is not None:
        scorer: Scorer = EnsembleScorer(
            spec.ensemble_models,
            spec.seed,
            lambda m: build_method(spec.member(m), registry, task, where=where).scorer,
        )
    else:
        factory = registry.get("scorer", spec.scorer.name).factory
        scorer = factory(parts, **spec.scorer.options)
    return Method(spec, parts, scorer)
