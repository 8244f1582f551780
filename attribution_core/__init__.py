"""attribution_core: interfaces, plugin registry, config, pipeline and evaluation harness.

Public API::

    from attribution_core import attribute, load_config, get_registry, hookimpl
    result = attribute("config.yaml", out="results/run")   # scores[label]: (n_train, n_query)
"""

from __future__ import annotations

from attribution_core.config import RunConfig, load_config
from attribution_core.errors import AttributionError, ConfigError, DataError, NumericalError
from attribution_core.hookspecs import hookimpl
from attribution_core.interfaces import (
    Batch,
    Curvature,
    CurvatureProblem,
    Executor,
    FitInputs,
    GradientCompressor,
    HessianApproximation,
    Measurement,
    MemorySink,
    MethodParts,
    Phase,
    PlanSizes,
    Scorer,
    ScoreSink,
    ScoringContext,
    Task,
)
from attribution_core.methods import MethodPreset, MethodSpec
from attribution_core.pipeline import AttributionResult, attribute
from attribution_core.registry import Component, Registry, get_registry

__version__ = "0.1.0"

__all__ = [
    "AttributionError",
    "AttributionResult",
    "Batch",
    "Component",
    "ConfigError",
    "Curvature",
    "CurvatureProblem",
    "DataError",
    "Executor",
    "FitInputs",
    "GradientCompressor",
    "HessianApproximation",
    "Measurement",
    "MemorySink",
    "MethodParts",
    "MethodPreset",
    "MethodSpec",
    "NumericalError",
    "Phase",
    "PlanSizes",
    "Registry",
    "RunConfig",
    "ScoreSink",
    "Scorer",
    "ScoringContext",
    "Task",
    "attribute",
    "get_registry",
    "hookimpl",
    "load_config",
]
