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
* gradients — ``select_parameters``, ``layout_of``, ``example_noise``, ``example_generator``,
  ``row_chunks``,
  ``per_example_gradients``, ``GradientStream``, ``gradient_chunks``, ``stack_gradients``,
  ``GradientCache``, ``cache_key``, ``model_fingerprint``, ``data_fingerprint``;
* progress — ``progress_bar`` (rich, stderr; free when disabled);
* sharding — ``ShardRunner`` (``FitInputs.shards`` / ``ScoringContext.shards``: per-shard jobs
  on the executor, fixed-order sums, resume), ``shard_ranges``, ``tree_add``,
  ``score_training_pass``;
* training-step hook — ``StepBatch``, ``TrainingRecipe``, ``OptimizerConfig``,
  ``OptimizerState``, ``Params``, ``optimizer_update``, ``init_optimizer_state``, ``DrawStreams``; replay
  on it: ``require_training_steps``, ``training_state_of``, ``initial_training_state``,
  ``unroll_training``, ``final_parameters``, ``load_parameters``, ``single_model_weights``,
  ``train_single_model``;
* builtin components to compose with — ``NoCompression``, ``Int8Compression``,
  ``LocalExecutor``;
* storage — ``atomic_save_npy``, ``atomic_write_json``, ``save_tensors``;
* errors — ``AttributionError``, ``ConfigError``, ``DataError``, ``NumericalError``,
  ``JobFailedError``.
"""

from __future__ import annotations

from attribution_core.batches import Batch, Forward, batch_size, index_batch
from attribution_core.build import Method, build_method
from attribution_core.builtin.compressors import Int8Compression, NoCompression
from attribution_core.builtin.executors import LocalExecutor
from attribution_core.config import RunConfig, load_config, validate_model
from attribution_core.errors import (
    AttributionError,
    ConfigError,
    DataError,
    JobFailedError,
    NumericalError,
)
from attribution_core.gradient_cache import (
    GradientCache,
    cache_key,
    data_fingerprint,
    model_fingerprint,
)
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
    example_generator,
    example_noise,
    layout_of,
    per_example_gradients,
    row_chunks,
    select_parameters,
)
from attribution_core.pipeline import AttributionResult, Resolved, attribute, resolve
from attribution_core.progress import progress_bar
from attribution_core.registry import Component, Registry, get_registry
from attribution_core.score_pass import score_training_pass
from attribution_core.shards import ShardRunner, shard_ranges, tree_add
from attribution_core.single_model import (
    final_parameters,
    initial_training_state,
    load_parameters,
    require_training_steps,
    single_model_weights,
    train_single_model,
    training_state_of,
    unroll_training,
)
from attribution_core.sinks import MemmapSink, TopK, TopKSink
from attribution_core.storage import atomic_save_npy, atomic_write_json, save_tensors
from attribution_core.training_step import (
    DESCRIPTION_BASELINE,
    AdamEpsOption,
    DrawStreams,
    OptimizerConfig,
    OptimizerOption,
    OptimizerState,
    Params,
    StepBatch,
    TrainingRecipe,
    WarmupStepsOption,
    init_optimizer_state,
    optimizer_update,
    recipe_description,
)

__version__ = "0.1.0"

__all__ = [
    "DESCRIPTION_BASELINE",
    "AdamEpsOption",
    "AttributionError",
    "AttributionResult",
    "Batch",
    "Checkpoint",
    "Component",
    "ConfigError",
    "Curvature",
    "CurvatureProblem",
    "DataError",
    "DrawStreams",
    "Executor",
    "FitInputs",
    "Forward",
    "GradientCache",
    "GradientCompressor",
    "GradientStream",
    "HessianApproximation",
    "Int8Compression",
    "JobFailedError",
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
    "OptimizerConfig",
    "OptimizerOption",
    "OptimizerState",
    "Params",
    "Phase",
    "PlanSizes",
    "Registry",
    "Resolved",
    "RunConfig",
    "ScoreSink",
    "Scorer",
    "ScoringContext",
    "ShardRunner",
    "StepBatch",
    "Task",
    "TopK",
    "TopKSink",
    "TrainingRecipe",
    "WarmupStepsOption",
    "atomic_save_npy",
    "atomic_write_json",
    "attribute",
    "batch_size",
    "build_method",
    "cache_key",
    "data_fingerprint",
    "example_generator",
    "example_noise",
    "final_parameters",
    "get_registry",
    "gradient_chunks",
    "hookimpl",
    "index_batch",
    "init_optimizer_state",
    "initial_training_state",
    "layout_of",
    "load_config",
    "load_parameters",
    "model_fingerprint",
    "optimizer_update",
    "per_example_gradients",
    "progress_bar",
    "recipe_description",
    "require_training_steps",
    "resolve",
    "resolve_method",
    "row_chunks",
    "save_tensors",
    "score_training_pass",
    "select_parameters",
    "shard_ranges",
    "single_model_weights",
    "stack_gradients",
    "train_single_model",
    "training_state_of",
    "tree_add",
    "unroll_training",
    "validate_model",
]
