"""``attribute(config) -> AttributionResult``: the one path from a config to scores.

config → :func:`resolve` validates every name and option once (all errors before any work) into
a read-only :class:`Resolved` → the Task builds or loads the model and the queries → each method
is built once (:func:`attribution_core.build.build_method`) and scored → ``OUT/<label>/
scores.npy`` + ``manifest.json``. ``bench``, ``counterfactual`` and ``suite build`` resolve
their config once and hand the :class:`Resolved` to :func:`attribute`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attribution_core.build import Method, build_measurement, build_method
from attribution_core.config import (
    DTYPES,
    MeasurementConfig,
    RunConfig,
    as_measurement,
    label_of,
    load_config,
)
from attribution_core.errors import ConfigError, DataError
from attribution_core.gradient_cache import model_fingerprint
from attribution_core.inputs import read_query_file, run_device
from attribution_core.interfaces import (
    Batch,
    Executor,
    Measurement,
    ScoringContext,
    Task,
    batch_size,
)
from attribution_core.locking import command_locks
from attribution_core.methods import MethodSpec, resolve_method
from attribution_core.models import load_model, trained_model
from attribution_core.outputs import MethodOutput, Scores, check_topk
from attribution_core.plan import check_memory
from attribution_core.precision import run_precision
from attribution_core.provenance import versions
from attribution_core.registry import Registry, get_registry
from attribution_core.score_cache import ScoreCache
from attribution_core.shards import ShardRunner, ShardStore
from attribution_core.storage import atomic_savez, atomic_write_json


@dataclass(frozen=True)
class Resolved:
    """A validated run (read-only): the config, its registry, task options and method specs."""

    config: RunConfig
    registry: Registry
    task_options: dict[str, Any]
    target: MeasurementConfig
    target_options: dict[str, Any]
    methods: tuple[MethodSpec, ...]

    def only(self, labels: set[str] | list[str]) -> Resolved:
        """The same run restricted to the methods with these labels (config included)."""
        keep = set(labels)
        entries = [e for e in self.config.methods if label_of(e) in keep]
        return replace(
            self,
            config=self.config.model_copy(update={"methods": entries}),
            methods=tuple(m for m in self.methods if m.label in keep),
        )

    def rebind(self, config: RunConfig) -> Resolved:
        """The same resolved methods with another model/queries/evaluation section.

        Only sections that resolution does not read may differ (``model``, ``queries``,
        ``evaluation``, ``executor`` options are re-validated by their users).
        """
        return replace(self, config=config)

    def oracle_labels(self) -> set[str]:
        """Labels of methods whose predictions are the suite's retrained oracle models."""
        return {
            m.label
            for m in self.methods
            if getattr(self.registry.get("scorer", m.scorer.name).factory, "uses_oracle", False)
        }


@dataclass
class AttributionResult:
    """Scores and manifests of every method of a run.

    Attributes:
        scores: label -> ``(n_train, n_query)`` array (float64 if the run's dtype is, else
            float32). With ``out`` and a float32 run it is a read-only ``np.memmap`` of
            ``OUT/<label>/scores.npy`` (the matrix is never held whole in memory); with
            ``topk`` it is a :class:`~attribution_core.sinks.TopK` instead.
        manifests: label -> the manifest written to ``OUT/<label>/manifest.json``.
        task, model, queries: what was attributed (for further use from Python).
        out: output directory, or None.
        methods: label -> the built :class:`~attribution_core.build.Method` (None when its
            finished output was reused).
    """

    scores: dict[str, Scores]
    manifests: dict[str, dict[str, Any]]
    task: Task
    model: nn.Module
    queries: Batch
    out: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    methods: dict[str, Method | None] = field(default_factory=dict)


def resolve(
    config: RunConfig, registry: Registry | None = None, *, task_given: bool = False
) -> Resolved:
    """Validate every name and option of ``config`` against the registry (no work done)."""
    reg = registry or get_registry()
    if config.task is None:
        if not task_given:
            raise ConfigError(
                "task: required (e.g. `task: {name: ddpm-digits}`); see `attribution list --kind task`"
            )
        task_opts = {}
    else:
        task_opts = reg.validate_options(
            "task", config.task.name, config.task.options, where="task"
        )
    target = as_measurement(config.target)
    comp = reg.get("measurement", target.name, where="target")
    target_opts = reg.validate_options("measurement", target.name, target.options, where="target")
    if not getattr(comp.factory, "is_target", True):
        targets = [
            c.name for c in reg.components("measurement") if getattr(c.factory, "is_target", True)
        ]
        raise ConfigError(
            f"target: {target.name!r} is a function only (for train_function/query_function), not "
            f"a target; valid targets: {', '.join(targets)}"
        )
    reg.validate_options(
        "executor", config.executor.name, config.executor.options, where="executor"
    )
    methods = tuple(
        resolve_method(m, reg, run_seed=config.seed, where=f"methods[{i}]")
        for i, m in enumerate(config.methods)
    )
    return Resolved(config, reg, task_opts, target, target_opts, methods)


def build_task(resolved: Resolved) -> Task:
    """Instantiate the task with the run's dtype and device."""
    cfg = resolved.config
    device = run_device(cfg.device)
    try:
        return resolved.registry.get("task", cfg.task.name).factory(
            dtype=DTYPES[cfg.dtype], device=device, **resolved.task_options
        )
    except MemoryError:
        raise ConfigError(
            f"task: {cfg.task.name!r} with options {resolved.task_options} does not fit in "
            f"memory; lower its sizes (e.g. n_train, dim)"
        ) from None
    except (RuntimeError, ValueError, OverflowError) as exc:
        if not any(w in str(exc) for w in ("allocate", "memory", "too big", "too large")):
            raise
        raise ConfigError(
            f"task: {cfg.task.name!r} with options {resolved.task_options} does not fit in "
            f"memory ({str(exc).splitlines()[0]}); lower its sizes (e.g. n_train, dim)"
        ) from None


def load_or_train_model(task: Task, config: RunConfig) -> nn.Module:
    """Load ``model.path`` (safetensors), else train from ``model.seed`` (cached if cache_dir)."""
    if config.model.path:
        return load_model(task, config.model.path, config.model.seed)
    return trained_model(task, config.model.seed, config.cache_dir)


def load_queries(task: Task, model: nn.Module, config: RunConfig) -> Batch:
    """Queries per ``config.queries``; shapes checked against the training data."""
    q = config.queries
    train = task.train_data()
    if q.source == "generated":
        queries = task.make_queries(model, q.count, q.seed)
    elif q.source == "train":
        queries = {k: v[: q.count] for k, v in train.items()}
    else:
        if not q.path or not Path(q.path).is_file():
            raise DataError(
                f"queries.path: {q.path!r} does not exist; give an .npz of named arrays"
            )
        queries = read_query_file(q.path, task, train)
    check_query_shapes(train, queries)
    return queries


def check_query_shapes(train: Batch, queries: Batch) -> None:
    """Every key the queries share with the training data must have the same trailing shape."""
    shared = [k for k in train if k in queries]
    if not shared:
        raise DataError(
            f"queries mismatch: expected keys {sorted(train)} of the training data, got {sorted(queries)}"
        )
    for k in shared:
        if tuple(train[k].shape[1:]) != tuple(queries[k].shape[1:]):
            raise DataError(
                f"queries mismatch: {k!r} expected per-example shape {tuple(train[k].shape[1:])} "
                f"(training data), got {tuple(queries[k].shape[1:])}"
            )
    batch_size({k: queries[k] for k in shared})


def attribute(
    config: str | Path | dict[str, Any] | RunConfig | Resolved,
    *,
    out: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    registry: Registry | None = None,
    progress: bool = False,
    task: Task | None = None,
) -> AttributionResult:
    """Run every method of ``config``; write ``OUT/<label>/scores.npy`` and ``manifest.json``.

    ``scores.npy`` is written in place (memory-mapped, allocated up front); with ``topk: K``
    ``OUT/<label>/topk.npz`` is written instead (see :mod:`attribution_core.outputs`).

    A method whose ``scores.npy`` exists in ``out`` with a manifest recording the same resolved
    method and inputs is not recomputed (resume at method granularity).

    Args:
        config: YAML path, dict, :class:`RunConfig`, or an already :class:`Resolved` run
            (what ``bench``/``counterfactual`` pass: nothing is resolved twice).
        out: output directory (None: nothing written).
        overrides: ``--set``-style ``"a.b=c"`` strings (not with a :class:`Resolved`).
        registry: a registry (default: a fresh one from the installed entry points).
        progress: show progress bars.
        task: a :class:`Task` object (e.g. :class:`attribution_core.wrap.ModuleTask`) used
            instead of ``config.task`` (or the task the caller already built).

    Returns:
        :class:`AttributionResult` with ``scores[label]: (n_train, n_query)``.
    """
    if isinstance(config, Resolved):
        if overrides:
            raise ConfigError("attribute: --set overrides apply to a config, not a resolved run")
        resolved = config
    else:
        cfg = load_config(config, overrides)
        resolved = resolve(cfg, registry, task_given=task is not None)
    with command_locks(out):
        return _attribute(resolved, out, progress, task)


def _attribute(
    resolved: Resolved, out: str | Path | None, progress: bool, task: Task | None
) -> AttributionResult:
    cfg = resolved.config
    torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}

    reg = resolved.registry
    # first: a Ray address that cannot be reached fails here, before any training
    executor = reg.create("executor", cfg.executor.name, where="executor", **cfg.executor.options)
    t0 = time.perf_counter()
    task = task if task is not None else build_task(resolved)
    check_topk(cfg.topk, task.n_train)
    check_memory(resolved, task, cfg.queries.count)  # before any training or scoring
    model = load_or_train_model(task, cfg)
    timings["model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    queries = load_queries(task, model, cfg)
    timings["queries"] = time.perf_counter() - t0
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        save_queries(out_dir, queries)
    run = _Run(
        resolved,
        task,
        model,
        queries,
        build_measurement(reg, task, resolved.target, "target"),
        executor,
        out_dir,
        timings,
        progress,
        ScoreCache.at(resolved.config.score_cache, queries),
    )
    result = AttributionResult({}, {}, task, model, queries, out_dir, timings)
    for i, spec in enumerate(resolved.methods):
        arr, manifest, method = run.method(spec, i)
        result.scores[spec.label] = arr
        result.manifests[spec.label] = manifest
        result.methods[spec.label] = method
    return result


@dataclass(frozen=True)
class _Run:
    """What every method of one ``attribute`` call shares (built once)."""

    resolved: Resolved
    task: Task
    model: nn.Module
    queries: Batch
    target: Measurement
    executor: Executor
    out: Path | None
    timings: dict[str, float]
    progress: bool
    score_cache: ScoreCache

    def identity(self, spec: MethodSpec) -> dict[str, Any]:
        """What defines a method's output (a finished output with the same identity is reused)."""
        cfg = self.resolved.config
        identity = {
            "method": spec.describe(),
            "task": self.task.describe(),
            "target": {"name": self.resolved.target.name, **self.resolved.target_options},
            "model": model_fingerprint(self.model),
            "queries": cfg.queries.model_dump(),
            "dtype": cfg.dtype,
        }
        if cfg.precision != "float32":  # float32 identities (and finished outputs) unchanged
            identity["precision"] = cfg.precision
        if cfg.topk is not None:  # full-score identities unchanged
            identity["topk"] = cfg.topk
        return identity

    def method(self, spec: MethodSpec, index: int) -> tuple[Scores, dict[str, Any], Method | None]:
        """Score one method (or reuse its finished output): ``(scores, manifest, method)``."""
        cfg, reg = self.resolved.config, self.resolved.registry
        identity = self.identity(spec)
        if self.out is not None and (
            done := self.score_cache.reused(self.out / spec.label, identity, cfg.topk)
        ):
            return (*done, None)
        method = build_method(spec, reg, self.task, where=f"methods[{index}]")
        output = MethodOutput(self.out / spec.label if self.out else None, cfg.topk, cfg.dtype)
        shards = self.shard_runner(spec, identity)
        context = ScoringContext(
            target=self.target,
            cache_dir=cfg.cache_dir,
            chunk_size=cfg.chunk_size,
            progress=self.progress,
            executor=self.executor,
            sink=output,
            shards=shards,
            query_block=cfg.query_block,
        )
        t0 = time.perf_counter()
        with output:
            with run_precision(cfg.precision, self.task.device) as precision:
                s = method.scorer.scores(self.task, self.model, self.queries, context)
            context.timings["total"] = time.perf_counter() - t0
            arr, files = output.finish(s)
        manifest = {
            "label": spec.label,
            "identity": identity,
            "config": cfg.model_dump(mode="json"),
            "seeds": {
                "run": cfg.seed,
                "method": spec.seed,
                "model": cfg.model.seed,
                "queries": cfg.queries.seed,
            },
            "threads": torch.get_num_threads(),
            "device": str(self.task.device),
            "precision": precision,
            "shape": list(arr.shape),
            "sign": "positive = removing the training example raises the target on the query",
            "timings": {**self.timings, **context.timings},
            "shards": {"count": cfg.shards, "phases": shards.counts},
            "info": context.info,
            "versions": versions(reg),
            "plugins": reg.plugin_info(),
        }
        if self.out is not None:
            manifest["files"] = files
            atomic_write_json(self.out / spec.label / "manifest.json", manifest)
            self.score_cache.store(identity, self.out / spec.label)
        if shards.store is not None:
            shards.store.clear()  # the finished output replaces the finished shards
        return arr, manifest, method

    def shard_runner(self, spec: MethodSpec, identity: dict[str, Any]) -> ShardRunner:
        """The method's shard runner; its finished shards live in ``OUT/<label>/.shards``."""
        cfg = self.resolved.config
        store = None
        if self.out is not None and (cfg.shards > 1 or self.executor.name != "local"):
            key = {**identity, "shards": cfg.shards, "chunk_size": cfg.chunk_size,
                   "threads": cfg.threads, "query_block": cfg.query_block}  # fmt: skip
            store = ShardStore(self.out / spec.label / ".shards", key)
        return ShardRunner(
            self.executor, cfg.shards, cfg.chunk_size, cfg.threads, store, self.progress
        )


def save_queries(out_dir: Path, queries: Batch) -> None:
    """``OUT/queries.npz`` with every query tensor (for reports and ``topk``)."""
    atomic_savez(out_dir / "queries.npz", {k: v.detach().cpu().numpy() for k, v in queries.items()})
