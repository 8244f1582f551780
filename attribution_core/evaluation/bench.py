"""``attribution bench``: every method of a config on a pinned suite, no training.

Writes ``DIR/<label>/{scores,predictions}.npy`` + ``manifest.json``, ``DIR/lds.csv``,
``DIR/pairwise.csv``, ``DIR/bench.json`` (everything the report needs) and the report itself.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from attribution_core.build import build_method
from attribution_core.config import (
    ModelConfig,
    QueriesConfig,
    RunConfig,
    as_measurement,
    load_config,
)
from attribution_core.errors import ConfigError
from attribution_core.evaluation import lds as L
from attribution_core.evaluation import single
from attribution_core.evaluation.runs import load_query_arrays, target_id
from attribution_core.evaluation.suite import Suite, load_suite, require_task
from attribution_core.evaluation.suite_checks import check_lds_block, check_masks, check_task
from attribution_core.interfaces import Scorer, Task
from attribution_core.locking import command_locks
from attribution_core.methods import MethodSpec
from attribution_core.outputs import require_full_scores
from attribution_core.pipeline import (
    AttributionResult,
    Resolved,
    attribute,
    build_task,
    load_queries,
    resolve,
)
from attribution_core.registry import Registry
from attribution_core.report.render import write_report
from attribution_core.storage import atomic_save_npy, atomic_savez, atomic_to_csv, atomic_write_json


def open_suite(cfg: RunConfig) -> tuple[Suite, str]:
    """The config's suite and target id, checked: the suite holds the target, and the config's
    ``evaluation.lds`` block (if any) agrees with the suite's.

    Raises:
        ConfigError / DataError: no or missing suite, target not held, conflicting lds block.
    """
    suite = load_suite(cfg.evaluation.suite)
    tid = target_id(as_measurement(cfg.target))
    if tid not in suite.targets:
        raise ConfigError(
            f"target: {tid!r} is not held by suite {str(suite.path)!r}; it holds "
            f"{', '.join(suite.targets)} — set `target` to one of them (e.g. --set target=...)"
        )
    check_lds_block(cfg, suite)
    return suite, tid


def prepare(
    cfg: RunConfig, out: Path, registry: Registry | None = None
) -> tuple[Suite, str, Resolved, Task]:
    """Resolve a bench config once and bind it to its suite, before any work.

    Returns:
        ``(suite, target id, resolved, task)`` — ``resolved`` is the config resolved once, with
        model = the suite's base model and queries = the suite's queries copied to ``out``;
        ``task`` is built (and its size checked against the suite's masks).

    Raises:
        ConfigError / DataError: no suite, missing suite, target not held, conflicting
            ``evaluation.lds``, masks that do not fit the task, any invalid method.
    """
    require_task(cfg)
    resolved = resolve(cfg, registry)
    suite, tid = open_suite(cfg)
    task = build_task(resolved)
    check_masks(suite, task.n_train)
    check_task(suite.meta, suite.path, task)
    bound = cfg.model_copy(
        update={
            "model": ModelConfig(
                seed=suite.meta["config"]["model"]["seed"],
                path=str(suite.path / "base" / "model.safetensors"),
            ),
            "queries": QueriesConfig(
                source="file",
                path=str(out / "suite_queries.npz"),
                count=int(suite.meta["n_query"]),
            ),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_savez(out / "suite_queries.npz", load_query_arrays(suite.path / "queries"))
    return suite, tid, resolved.rebind(bound), task


def bench(
    config: str | Path | dict[str, Any] | RunConfig,
    out: str | Path,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = False,
    n_boot: int = 1000,
) -> pd.DataFrame:
    """Attribute every method on the suite's model and queries, evaluate LDS, write the report.

    Returns:
        The ``lds.csv`` table (one row per method).
    """
    cfg = load_config(config, overrides)
    require_full_scores(cfg.topk, "bench")
    out = Path(out)
    with command_locks(out, cfg.evaluation.suite):
        return _bench(cfg, out, progress, n_boot)


def _bench(cfg: RunConfig, out: Path, progress: bool, n_boot: int) -> pd.DataFrame:
    suite, tid, resolved, task = prepare(cfg, out)
    t0 = time.perf_counter()
    # oracle scorers (exact retraining) are evaluated from the suite's oracle models: no training
    oracle_labels = resolved.oracle_labels()
    scored = [m.label for m in resolved.methods if m.label not in oracle_labels]
    if scored:
        result = attribute(resolved.only(scored), out=out, progress=progress, task=task)
        queries = result.queries
    else:
        result = None
        queries = load_queries(task, task.build_model(0), resolved.config)
    truth = suite.truth(tid)
    idx = L.bootstrap_indices(truth.shape[0], n_boot, seed=cfg.seed)
    rows, boots, per_query = [], {}, {}
    predicted = [
        (
            m.label,
            m.name,
            m.option("damping"),
            *_predict(suite, tid, resolved, task, result, i, out),
        )
        for i, m in enumerate(resolved.methods)
    ]
    loo = single.loo_predictions(suite, tid)
    if loo is not None:  # single-model suites with evaluation.loo: the additive LOO reference
        _write_loo(out, suite, tid)
        predicted.append(("leave-one-out", "leave-one-out", None, loo, math.nan))
    for label, name, damping, pred, seconds in predicted:
        atomic_save_npy(out / label / "predictions.npy", pred)
        s = L.summarize(pred, truth, idx)
        boots[label] = s.pop("boot")
        per_query[label] = s.pop("per_query").tolist()
        rows.append(
            {
                "label": label,
                "method": name,
                "target": tid,
                "damping": None if damping is None else float(damping),
                **s,
                "seconds": seconds,
                "protocol": suite.protocol,
                **single.cross_columns(pred, suite, tid),
            }
        )
    table = pd.DataFrame(rows, columns=list(L.LDS_COLUMNS))
    atomic_to_csv(out / "lds.csv", table)
    pair = pd.DataFrame(L.pairwise(boots, {r["label"]: r["lds_mean"] for r in rows}))
    atomic_to_csv(out / "pairwise.csv", pair)
    train_img = task.images(task.train_data())
    query_img = task.images(queries)
    if train_img is not None and query_img is not None:
        atomic_save_npy(out / "images" / "train.npy", train_img.detach().cpu().float().numpy())
        atomic_save_npy(out / "images" / "queries.npy", query_img.detach().cpu().float().numpy())
    meta = {
        "suite": str(suite.path),
        "suite_command": suite.meta.get("command"),
        "target": tid,
        "targets_in_suite": suite.targets,
        "task": suite.meta.get("task"),
        "protocol": suite.protocol,
        "lds": suite.meta["lds"],
        "cross": suite.meta.get("cross"),
        "n_train": int(suite.masks.shape[1]),
        "reliability": suite.meta.get("reliability", {}),
        "null": L.null_lds(truth, suite.masks, seed=cfg.seed),
        "per_query": per_query,
        "n_boot": n_boot,
        "seconds_total": time.perf_counter() - t0,
        "methods": {m.label: m.describe() for m in resolved.methods},
    }
    atomic_write_json(out / "bench.json", meta)
    write_report(out)
    return table


def _predict(
    suite: Suite,
    tid: str,
    resolved: Resolved,
    task: Task,
    result: AttributionResult | None,
    index: int,
    out: Path,
) -> tuple[np.ndarray, float]:
    """``(predictions (M, Q) float64, seconds)`` of method ``index`` on the suite's masks.

    Additive methods: ``predict_subsets`` of their scores, with the first-order factor
    ``1 − removed_weight`` when the suite down-weights instead of removing. Oracle methods
    (exact retraining): the suite's oracle models minus its full-data models, or under the
    single-model protocol the truth itself (:data:`single.ORACLE_NOTE`).
    """
    method = resolved.methods[index]
    masks = torch.as_tensor(suite.masks)
    t1 = time.perf_counter()
    if method.label in resolved.oracle_labels():
        scorer = build_method(method, resolved.registry, task, where=f"methods[{index}]").scorer
        truth = suite.truth(tid)
        scores = torch.zeros(suite.masks.shape[1], truth.shape[2], dtype=torch.float64)
        if suite.protocol == single.SINGLE:
            oracle, note = single.oracle_predictions(suite, tid), single.ORACLE_NOTE
        else:
            full = torch.as_tensor(suite.full(tid), dtype=torch.float64).mean(dim=0)
            oracle = torch.as_tensor(suite.oracle(tid), dtype=torch.float64) - full
            note = (
                "predictions = the suite's oracle models (fresh seed per subset) minus the "
                "mean of its full-data models; no scores.npy (leave-one-out retraining not run)"
            )
        pred = scorer.predict_subsets(masks, scores, oracle=torch.as_tensor(oracle))
        seconds = time.perf_counter() - t1
        identity = {"method": method.describe(), "suite": str(suite.path), "target": tid}
        atomic_write_json(
            out / method.label / "manifest.json",
            {
                "label": method.label,
                "identity": identity,
                "note": note,
                "timings": {"total": seconds},
            },
        )
        return pred.detach().cpu().numpy().astype(np.float64), seconds
    assert result is not None  # scored methods ran through attribute()
    scorer = scorer_of(result, method, resolved.registry, task, index)
    scores = torch.from_numpy(np.array(result.scores[method.label], dtype=np.float64))
    r = float(suite.meta["lds"].get("removed_weight", 0.0))
    pred = scorer.predict_subsets(masks, scores, **({"removed_weight": r} if r else {}))
    seconds = float(result.manifests[method.label]["timings"].get("total", math.nan))
    return pred.detach().cpu().numpy().astype(np.float64), seconds


def _write_loo(out: Path, suite: Suite, tid: str) -> None:
    atomic_write_json(
        out / "leave-one-out" / "manifest.json",
        {
            "label": "leave-one-out",
            "identity": {"method": "leave-one-out", "suite": str(suite.path), "target": tid},
            "note": "additive leave-one-out: predictions = Σ over each mask's removed examples of "
            "m(θ_{D∖j}) − m(θ_D), from the suite's loo/ models (single-model protocol)",
        },
    )


def scorer_of(
    result: AttributionResult, spec: MethodSpec, registry: Registry, task: Task, index: int
) -> Scorer:
    """The scorer ``attribute`` built for ``spec`` (built here when its output was reused)."""
    method = result.methods.get(spec.label)
    if method is not None:
        return method.scorer
    return build_method(spec, registry, task, where=f"methods[{index}]").scorer
