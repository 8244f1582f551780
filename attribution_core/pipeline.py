"""``attribute(config) -> AttributionResult``: the one path from a config to scores.

config → registry resolves every name and option (all errors before any work) → Task builds or
loads the model and the queries → per method: Scorer (Hessian.fit → gradients → compressor →
scores) → ``OUT/<label>/scores.npy`` + ``manifest.json``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attribution_core.config import (
    MeasurementConfig,
    RunConfig,
    as_measurement,
    load_config,
)
from attribution_core.errors import ConfigError, DataError
from attribution_core.gradients import cache_key, model_fingerprint
from attribution_core.interfaces import Batch, Measurement, ScoringContext, Task, batch_size
from attribution_core.methods import ResolvedMethod, resolve_method
from attribution_core.precision import run_precision
from attribution_core.registry import Registry, get_registry
from attribution_core.storage import atomic_save_npy, atomic_write_json, save_tensors

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Resolved:
    """A validated run: the config, its registry, task options and resolved methods."""

    config: RunConfig
    registry: Registry
    task_options: dict[str, Any]
    target: MeasurementConfig
    target_options: dict[str, Any]
    methods: list[ResolvedMethod]


@dataclass
class AttributionResult:
    """Scores and manifests of every method of a run.

    Attributes:
        scores: label -> ``(n_train, n_query)`` array (float64 if the run's dtype is, else float32).
        manifests: label -> the manifest written to ``OUT/<label>/manifest.json``.
        task, model, queries: what was attributed (for further use from Python).
        out: output directory, or None.
    """

    scores: dict[str, np.ndarray]
    manifests: dict[str, dict[str, Any]]
    task: Task
    model: nn.Module
    queries: Batch
    out: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


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
    methods = [
        resolve_method(m, reg, run_seed=config.seed, where=f"methods[{i}]")
        for i, m in enumerate(config.methods)
    ]
    for i, m in enumerate(methods):
        for role, ref in (
            ("train_function", m.train_function_config),
            ("query_function", m.query_function_config),
        ):
            if ref is not None:
                reg.validate_options(
                    "measurement", ref.name, ref.options, where=f"methods[{i}].{role}"
                )
    return Resolved(config, reg, task_opts, target, target_opts, methods)


def build_task(resolved: Resolved) -> Task:
    """Instantiate the task with the run's dtype and device."""
    cfg = resolved.config
    return resolved.registry.get("task", cfg.task.name).factory(
        dtype=DTYPES[cfg.dtype], device=torch.device(cfg.device), **resolved.task_options
    )


def build_measurement(
    registry: Registry, task: Task, ref: MeasurementConfig, where: str
) -> Measurement:
    """Instantiate a measurement for ``task``."""
    return registry.create("measurement", ref.name, task, where=where, **ref.options)


def build_method(resolved: Resolved, method: ResolvedMethod, task: Task, index: int) -> Any:
    """Fill in the method's components and return its scorer."""
    reg = resolved.registry
    where = f"methods[{index}]"
    if method.hessian_name:
        method.hessian = reg.create(
            "hessian", method.hessian_name, where=where, **method.hessian_options
        )
    if method.compressor_name:
        method.compressor = reg.create(
            "compressor", method.compressor_name, where=where, **method.compressor_options
        )
    method.train_function = build_measurement(
        reg, task, method.train_function_config, f"{where}.train_function"
    )
    if method.query_function_config is not None:
        method.query_function = build_measurement(
            reg, task, method.query_function_config, f"{where}.query_function"
        )
    return reg.get("scorer", method.scorer_name).factory(method, **method.scorer_options)


def load_or_train_model(task: Task, config: RunConfig) -> nn.Module:
    """Load ``model.path`` (safetensors), else train from ``model.seed`` (cached if cache_dir)."""
    if config.model.path:
        from safetensors.torch import load_file

        path = Path(config.model.path)
        if not path.is_file():
            raise DataError(f"model.path: {str(path)!r} does not exist; give a .safetensors file")
        model = task.build_model(config.model.seed)
        try:
            model.load_state_dict(load_file(str(path)))
        except RuntimeError as exc:
            raise DataError(
                f"model.path: {str(path)!r} does not fit task {task.name!r}: {exc}"
            ) from None
        return model.to(task.device).eval()
    if config.cache_dir:
        key = cache_key(task=task.describe(), seed=config.model.seed, dtype=config.dtype)
        path = Path(config.cache_dir) / "models" / f"{key}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            model = task.build_model(config.model.seed)
            model.load_state_dict(load_file(str(path)))
            return model.to(task.device).eval()
        model = task.base_model(config.model.seed).eval()
        save_tensors(path, model.state_dict(), {"task": json.dumps(task.describe(), default=str)})
        return model
    return task.base_model(config.model.seed).eval()


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
        with np.load(q.path) as npz:
            queries = {
                k: torch.as_tensor(npz[k]).to(
                    device=task.device, dtype=train[k].dtype if k in train else None
                )
                for k in npz.files
            }
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


def versions() -> dict[str, str]:
    """Versions of Python, torch, numpy and this package (recorded in manifests)."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for dist in ("attribution-framework", "curvlinops-for-pytorch", "traker", "open_clip_torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def attribute(
    config: str | Path | dict[str, Any] | RunConfig,
    *,
    out: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    registry: Registry | None = None,
    progress: bool = False,
    task: Task | None = None,
) -> AttributionResult:
    """Run every method of ``config``; write ``OUT/<label>/scores.npy`` and ``manifest.json``.

    A method whose ``scores.npy`` exists in ``out`` with a manifest recording the same resolved
    method and inputs is not recomputed (resume at method granularity).

    Args:
        config: YAML path, dict or :class:`RunConfig`.
        out: output directory (None: nothing written).
        overrides: ``--set``-style ``"a.b=c"`` strings.
        registry: a registry (default: a fresh one from the installed entry points).
        progress: show progress bars.
        task: a :class:`Task` object (e.g. :class:`attribution_core.wrap.ModuleTask`) used
            instead of ``config.task``.

    Returns:
        :class:`AttributionResult` with ``scores[label]: (n_train, n_query)``.
    """
    cfg = load_config(config, overrides)
    resolved = resolve(cfg, registry, task_given=task is not None)
    torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    task = task if task is not None else build_task(resolved)
    model = load_or_train_model(task, cfg)
    timings["model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    queries = load_queries(task, model, cfg)
    timings["queries"] = time.perf_counter() - t0
    target = build_measurement(resolved.registry, task, resolved.target, "target")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        save_queries(out_dir, queries)

    executor = resolved.registry.create(
        "executor", cfg.executor.name, where="executor", **cfg.executor.options
    )
    fingerprint = model_fingerprint(model)
    scores: dict[str, np.ndarray] = {}
    manifests: dict[str, dict[str, Any]] = {}
    for i, method in enumerate(resolved.methods):
        identity = {
            "method": method.describe(),
            "task": task.describe(),
            "target": {"name": resolved.target.name, **resolved.target_options},
            "model": fingerprint,
            "queries": cfg.queries.model_dump(),
            "dtype": cfg.dtype,
        }
        if cfg.precision != "float32":  # float32 identities (and finished outputs) unchanged
            identity["precision"] = cfg.precision
        if out_dir is not None and (done := _finished(out_dir / method.label, identity)):
            scores[method.label], manifests[method.label] = done
            continue
        scorer = build_method(resolved, method, task, i)
        context = ScoringContext(
            seed=method.seed,
            target=target,
            cache_dir=cfg.cache_dir,
            chunk_size=cfg.chunk_size,
            progress=progress,
            executor=executor,
        )
        t0 = time.perf_counter()
        with run_precision(cfg.precision, task.device) as precision:
            s = scorer.scores(task, model, queries, context)
        context.timings["total"] = time.perf_counter() - t0
        arr = s.detach().cpu().numpy()
        if cfg.dtype == "float32":
            arr = arr.astype(np.float32)
        manifest = {
            "label": method.label,
            "identity": identity,
            "config": cfg.model_dump(mode="json"),
            "seeds": {
                "run": cfg.seed,
                "method": method.seed,
                "model": cfg.model.seed,
                "queries": cfg.queries.seed,
            },
            "threads": torch.get_num_threads(),
            "device": str(task.device),
            "precision": precision,
            "shape": list(arr.shape),
            "sign": "positive = removing the training example raises the target on the query",
            "timings": {**timings, **context.timings},
            "info": context.info,
            "versions": versions(),
            "plugins": resolved.registry.plugin_info(),
        }
        if out_dir is not None:
            atomic_save_npy(out_dir / method.label / "scores.npy", arr.astype(np.float32))
            atomic_write_json(out_dir / method.label / "manifest.json", manifest)
        scores[method.label] = arr
        manifests[method.label] = manifest
    return AttributionResult(scores, manifests, task, model, queries, out_dir, timings)


def _finished(
    directory: Path, identity: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any]] | None:
    scores, manifest = directory / "scores.npy", directory / "manifest.json"
    if not (scores.is_file() and manifest.is_file()):
        return None
    try:
        saved = json.loads(manifest.read_text())
        if saved.get("identity") != json.loads(json.dumps(identity, default=str)):
            return None
        return np.load(scores), saved
    except (ValueError, OSError):
        return None


def save_queries(out_dir: Path, queries: Batch) -> None:
    """``OUT/queries.npz`` with every query tensor (for reports and ``topk``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".queries.tmp.npz"
    np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in queries.items()})
    tmp.replace(out_dir / "queries.npz")
