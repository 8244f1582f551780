"""attribution_core: interfaces, plugin registry, config, pipeline and evaluation harness.

Public API::

    from attribution_core import attribute, load_config, get_registry, hookimpl
    result = attribute("config.yaml", out="results/run")   # scores[label]: (n_train, n_query)

**The plugin API** is exactly the names in ``__all__`` below: a plugin (ours or a third party's)
imports from ``attribution_core`` and from no core module directly (a test enforces this for
the first-party plugins). Groups:

* interfaces and the records passed to them — ``Task`` (``Checkpoint``), ``Measurement``,
  ``HessianApproximation`` (``FitInputs``), ``Curvature``, ``CurvatureProblem``,
  ``GradientCompressor``, ``Scorer`` (``MethodParts``, ``ScoringContext``, ``ScoreSink``,
  ``PlanSizes``, ``Phase``), ``Executor``, ``Batch``/``Forward`` and ``batch_size``/``index_batch``;
* registration — ``hookimpl``, ``Component``, ``MethodPreset``, ``validate_model``;
* gradients — ``select_parameters``, ``layout_of``, ``example_noise``,
  ``per_example_gradients``, ``GradientStream``, ``gradient_chunks``, ``stack_gradients``,
  ``GradientCache``, ``cache_key``, ``model_fingerprint``;
* builtin components to compose with — ``NoCompression``, ``Int8Compression``,
  ``LocalExecutor``;
* storage — ``atomic_save_npy``, ``atomic_write_json``, ``save_tensors``;
* errors — ``AttributionError``, ``ConfigError``, ``DataError``, ``NumericalError``.
"""

from __future__ import annotations

from attribution_core.batches import Batch, Forward, batch_size, index_batch
from attribution_core.build import Method, build_method
from attribution_core.builtin.compressors import Int8Compression, NoCompression
from attribution_core.builtin.executors import LocalExecutor
from attribution_core.config import RunConfig, load_config, validate_model
from attribution_core.errors import AttributionError, ConfigError, DataError, NumericalError
from attribution_core.gradient_cache import GradientCache, cache_key, model_fingerprint
from attribution_core.gradients import GradientStream, gradient_chunks, stack_gradients
from attribution_core.hookspecs import hookimpl
from attribution_core.interfaces import (
    Checkpoint,
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
from attribution_core.methods import MethodPreset, MethodSpec, resolve_method
from attribution_core.per_example import (
    example_noise,
    layout_of,
    per_example_gradients,
    select_parameters,
)
from attribution_core.pipeline import AttributionResult, Resolved, attribute, resolve
from attribution_core.registry import Component, Registry, get_registry
from attribution_core.sinks import MemmapSink, TopK, TopKSink
from attribution_core.storage import atomic_save_npy, atomic_write_json, save_tensors

__version__ = "0.1.0"

__all__ = [
    "AttributionError",
    "AttributionResult",
    "Batch",
    "Checkpoint",
    "Component",
    "ConfigError",
    "Curvature",
    "CurvatureProblem",
    "DataError",
    "Executor",
    "FitInputs",
    "Forward",
    "GradientCache",
    "GradientCompressor",
    "GradientStream",
    "HessianApproximation",
    "Int8Compression",
    "LocalExecutor",
    "Measurement",
    "MemmapSink",
    "MemorySink",
    "Method",
    "MethodParts",
    "MethodPreset",
    "MethodSpec",
    "NoCompression",
    "NumericalError",
    "Phase",
    "PlanSizes",
    "Registry",
    "Resolved",
    "RunConfig",
    "ScoreSink",
    "Scorer",
    "ScoringContext",
    "Task",
    "TopK",
    "TopKSink",
    "atomic_save_npy",
    "atomic_write_json",
    "attribute",
    "batch_size",
    "build_method",
    "cache_key",
    "example_noise",
    "get_registry",
    "gradient_chunks",
    "hookimpl",
    "index_batch",
    "layout_of",
    "load_config",
    "model_fingerprint",
    "per_example_gradients",
    "resolve",
    "resolve_method",
    "save_tensors",
    "select_parameters",
    "stack_gradients",
    "validate_model",
]
