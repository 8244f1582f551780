"""Run configuration: pydantic models, YAML loading and ``--set a.b=c`` overrides.

Every model forbids unknown keys. Component-specific options (a task's ``classes``, a method's
``damping``) are validated against the options model the component registered, when the config
is resolved (:func:`attribution_core.pipeline.resolve`) — still before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from attribution_core.config_validation import (  # re-exported: the public name stays here too
    format_validation_error as format_validation_error,
)
from attribution_core.config_validation import validate_model
from attribution_core.errors import ConfigError, DataError
from attribution_core.overrides import apply_override, parse_override

DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""``RunConfig.dtype`` -> torch dtype."""


class StrictModel(BaseModel):
    """Base: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class OpenModel(BaseModel):
    """``name`` plus component options that the named component's own model validates."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="Registered component name (see `attribution list`).")

    @property
    def options(self) -> dict[str, Any]:
        """The keys besides ``name`` (and ``label``)."""
        return {k: v for k, v in (self.model_extra or {}).items()}


class TaskConfig(OpenModel):
    """``{name: ddpm-digits, classes: [0, 1], ...}``: the task and its options."""


class MeasurementConfig(OpenModel):
    """A measurement by name with options, e.g. ``{name: timestep-loss, t: 500}``."""


class ComponentConfig(OpenModel):
    """A component by name with its options, e.g. ``{name: projection, proj_dim: 4096}``."""


class EnsembleConfig(StrictModel):
    """Average a gradient-based method's scores over independently trained models."""

    models: int = Field(
        ...,
        ge=1,
        description="M: models averaged. Member 0 is the run's model; member m ≥ 1 is trained on "
        "all of D from seed (method seed + m), once (cached under cache_dir/models), and uses "
        "that seed for its own projection and Monte-Carlo draws.",
    )


class MethodConfig(BaseModel):
    """A method: a preset by name with overrides, or components named directly.

    ``{name: trak, proj_dim: 2048}`` routes each flat override to whichever of the preset's
    components declares that field; ``hessian: {name: kfac, damping: 1e-6}`` replaces a
    component (dropping the replaced component's preset defaults); without ``name``, ``scorer``
    (and ``label``) name the method's components directly.
    """

    model_config = ConfigDict(extra="allow")
    name: str | None = Field(
        None,
        description="Method preset (see `attribution list --kind method`), or omit and "
        "give `scorer`.",
    )
    label: str | None = Field(None, description="Output directory name; default: the method name.")
    seed: int | None = Field(
        None, description="Seed of the method's random choices; default: run seed."
    )
    scorer: str | ComponentConfig | None = Field(
        None, description="Scorer (`influence`, `gradient-similarity`, ...): replaces the preset's."
    )
    hessian: str | ComponentConfig | None = Field(
        None, description="Hessian approximation with its options: replaces the preset's."
    )
    compressor: str | ComponentConfig | None = Field(
        None, description="Gradient compressor with its options: replaces the preset's."
    )
    train_function: str | MeasurementConfig | None = Field(
        None, description="Measurement whose gradient stands for ∇ℓ(θ, x_j)."
    )
    query_function: str | MeasurementConfig | None = Field(
        None, description="Measurement differentiated on the queries; default: the target."
    )
    ensemble: EnsembleConfig | None = Field(
        None, description="`{models: M}`: average the scores over M independently trained models."
    )

    @property
    def options(self) -> dict[str, Any]:
        """The flat overrides (keys that are not fields of the entry itself)."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _named(self) -> MethodConfig:
        if self.name is None and self.scorer is None:
            raise ValueError(
                "a method entry needs `name` (a preset, see `attribution list --kind method`) "
                "or `scorer` with a `label` (components named directly)"
            )
        if self.name is None and self.label is None:
            raise ValueError(
                "a method entry without `name` needs a `label` (its output directory), e.g. "
                "`{label: ekfac-proj, scorer: influence, hessian: ekfac}`"
            )
        return self


class QueriesConfig(StrictModel):
    """Where query examples come from."""

    source: Literal["generated", "train", "file"] = Field(
        "generated",
        description="generated: task.make_queries(model); train: the first `count` training "
        "examples; file: an .npz/.safetensors of named arrays at `path`.",
    )
    count: int = Field(16, ge=1, description="Number of queries.")
    seed: int = Field(0, description="Seed for generating queries.")
    path: str | None = Field(None, description="File for source=file.")


class ModelConfig(StrictModel):
    """The model being attributed."""

    seed: int = Field(0, description="Seed of the base model's initialisation and training.")
    path: str | None = Field(
        None, description="Load trained weights (safetensors) instead of training."
    )


class LDSConfig(StrictModel):
    """Linear data-modelling score settings (used when building a suite)."""

    subsets: int = Field(64, ge=2, description="Number of random subsets (masks).")
    seeds: int = Field(3, ge=1, description="Models trained per subset.")
    kept_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="α: fraction kept per subset.")
    removed_weight: float = Field(
        0.0, ge=0.0, lt=1.0, description="Weight of removed examples (0.5 = down-weighting)."
    )
    batch: int = Field(
        8,
        ge=1,
        description="Models per train_ensemble call (one executor job; the resume unit "
        "is still one file per model).",
    )
    protocol: Literal["distributional", "single-model"] = Field(
        "distributional",
        description="distributional: retrain each subset from fresh seeds (what a model trained "
        "on D∖S does on average); single-model: retrain with the base model's seed, "
        "initialisation and whole draw stream (what *this* model learned from x_j). `bench` "
        "takes the protocol from the suite.",
    )
    cross_seeds: int = Field(
        0,
        ge=0,
        description="single-model only: K other seeds under which the base model and the first "
        "32 masks are retrained too (bench reports lds_cross_seed).",
    )
    cross_seed_scope: Literal["stream", "init+stream"] = Field(
        "stream",
        description="What the cross seeds change: stream (same initialisation, other data order "
        "and noise) or init+stream (both).",
    )

    @model_validator(mode="after")
    def _cross_seeds_need_single_model(self) -> LDSConfig:
        if self.cross_seeds and self.protocol != "single-model":
            raise ValueError(
                f"cross_seeds: {self.cross_seeds} needs protocol: single-model (cross-seed "
                f"transfer asks how a single model's attribution carries over to other seeds); "
                f"set protocol: single-model or remove cross_seeds"
            )
        return self


class CounterfactualConfig(StrictModel):
    """Retraining without top influences."""

    remove_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seeds: int = Field(3, ge=1)
    queries: int = Field(5, ge=1)
    regenerate: bool = Field(
        False,
        description="Also regenerate each query from the same sampling noise with every "
        "retrained model (top, random and full data) and report the pixel distance "
        "‖x_regen − x_query‖₂; needs queries.source: generated.",
    )


class EvaluationConfig(StrictModel):
    """Ground truth for LDS and counterfactual evaluation."""

    suite: str | None = Field(None, description="Path to a pinned suite directory.")
    targets: list[str | MeasurementConfig] | None = Field(
        None, description="Targets a built suite measures (default: [target])."
    )
    lds: LDSConfig | None = None
    counterfactual: CounterfactualConfig | None = None
    loo: bool = Field(
        False,
        description="single-model suites: also retrain every leave-one-out model (N runs) and "
        "add the additive leave-one-out row to bench.",
    )

    @model_validator(mode="after")
    def _loo_needs_single_model(self) -> EvaluationConfig:
        if self.loo and (self.lds is None or self.lds.protocol != "single-model"):
            raise ValueError(
                "loo: true needs evaluation.lds.protocol: single-model (leave-one-out models "
                "are retrained with the base model's seed); set the protocol or remove loo"
            )
        return self


class ExecutorConfig(OpenModel):
    """``{name: local}`` or ``{name: ray, address: auto}``."""

    name: str = "local"


class RunConfig(StrictModel):
    """One YAML file: task, queries, methods, target, evaluation, executor."""

    task: TaskConfig | None = Field(
        None,
        description="`{name: <task>, <task options>...}` (see Tasks below); required unless a "
        "Task object is passed to `attribute(..., task=...)`.",
    )
    methods: list[str | MethodConfig] = Field(
        min_length=1, description="Method names or `{name, label, <overrides>}` entries."
    )
    target: str | MeasurementConfig = Field("loss", description="What is predicted.")
    queries: QueriesConfig = Field(QueriesConfig(), description="Where queries come from.")
    model: ModelConfig = Field(ModelConfig(), description="The model being attributed.")
    evaluation: EvaluationConfig = Field(
        EvaluationConfig(), description="Suite, LDS and counterfactual settings."
    )
    executor: ExecutorConfig = Field(
        ExecutorConfig(), description="`{name: local}` or `{name: ray, address: auto}`."
    )
    seed: int = Field(0, description="Run seed: default for every method's random choices.")
    threads: int = Field(
        1, ge=1, description="torch intra-op threads (recorded; bitwise repeatability)."
    )
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")
    dtype: Literal["float32", "float64"] = Field("float32", description="Model and gradient dtype.")
    precision: Literal["float32", "tf32", "bf16"] = Field(
        "float32",
        description="tf32: TF32 in CUDA matmuls/convolutions during each method (no-op on "
        "CPU); bf16: per-example and query gradients under bfloat16 autocast, gradients and "
        "scores kept float32. Needs dtype float32. Recorded in each manifest.",
    )
    chunk_size: int = Field(64, ge=1, description="Training examples per gradient chunk.")
    shards: int = Field(
        1,
        ge=1,
        description="Training-set shards (row ranges, multiples of chunk_size): the unit of "
        "distribution on the executor (one Ray task each), of resume after a killed run, and of "
        "the fixed-order sums of curvature statistics. Same shards and threads: the same bits "
        "on any executor. See docs/running-at-scale.md.",
    )
    query_block: int | None = Field(
        None,
        ge=1,
        description="Compute query gradients in blocks of this many (only one block's raw "
        "gradients, block × p, are alive). Prepared (preconditioned/compressed) blocks share one "
        "training pass while they fit 256 MiB, else each group costs a pass (read back from the "
        "gradient cache when cache_dir is set). None: all queries at once.",
    )
    cache_dir: str | None = Field(None, description="Cache for gradients and curvature factors.")
    score_cache: str | None = Field(
        None,
        description="Directory of finished method outputs shared across output directories, "
        "keyed by method, task, target, model bytes and query data: `attribute` or `bench` "
        "into another OUT restores a method's scores from it instead of scoring again (e.g. "
        "suites sharing a base model and queries). None: off.",
    )
    topk: int | None = Field(
        None,
        ge=1,
        description="Write, per query, only the K most positive and K most negative training "
        "examples (`OUT/<label>/topk.npz`) instead of the full `scores.npy`; at most n_train. "
        "`bench` and `counterfactual` need the full scores and refuse it.",
    )

    @model_validator(mode="after")
    def _precision_needs_float32(self) -> RunConfig:
        if self.precision != "float32" and self.dtype != "float32":
            raise ValueError(
                f"precision {self.precision!r} lowers float32 arithmetic; it needs dtype "
                f"float32 (got {self.dtype!r}): set precision: float32 or dtype: float32"
            )
        return self

    @model_validator(mode="after")
    def _unique_labels(self) -> RunConfig:
        labels = [label_of(m) for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"duplicate method labels {dup}: give each entry its own `label`")
        return self


def label_of(entry: str | MethodConfig) -> str:
    """A method entry's label (its name unless set)."""
    if isinstance(entry, str):
        return entry
    return entry.label or entry.name or ""


def as_measurement(ref: str | MeasurementConfig) -> MeasurementConfig:
    """Normalise ``"loss"`` / ``{name: ...}`` to a :class:`MeasurementConfig`."""
    return MeasurementConfig(name=ref) if isinstance(ref, str) else ref


# ---- loading and overrides ----------------------------------------------------------------------
def load_config(
    source: str | Path | dict[str, Any] | RunConfig, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Load and validate a run config from YAML path, dict or model, applying ``--set`` overrides.

    Raises:
        DataError: the file does not exist or is not a YAML mapping.
        ConfigError: validation failed (message names the key paths).
    """
    if isinstance(source, RunConfig):
        if not overrides:
            return source
        data = source.model_dump(exclude_none=True)
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"config file {str(path)!r} does not exist; pass a YAML file path")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(data, key_path, value)
    return validate_model(RunConfig, data)  # type: ignore[return-value]
