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

from attribution_core.config import RunConfig, as_measurement, label_of, load_config
from attribution_core.errors import ConfigError
from attribution_core.evaluation import lds as L
from attribution_core.evaluation.runs import load_query_arrays, target_id
from attribution_core.evaluation.suite import (
    Suite,
    check_lds_block,
    check_masks,
    load_suite,
    require_task,
)
from attribution_core.storage import atomic_save_npy, atomic_write_json

LDS_COLUMNS = [
    "label",
    "method",
    "target",
    "damping",
    "lds_mean",
    "lds_stderr",
    "lds_ci_low",
    "lds_ci_high",
    "n_queries",
    "seconds",
]


def damping_of(method: Any) -> float | None:
    """The method's damping λ (hessian or scorer option), or None."""
    for opts in (method.hessian_options, method.scorer_options):
        if opts.get("damping") is not None:
            return float(opts["damping"])
    return None


def prepare(cfg: RunConfig, out: Path) -> tuple[Suite, str, RunConfig]:
    """Validate a bench config against its suite before any work; return the suite-bound config
    (model = the suite's base model, queries = the suite's queries copied to ``out``).

    Raises:
        ConfigError / DataError: no suite, missing suite, target not held, conflicting
            ``evaluation.lds``, masks that do not fit the task.
    """
    from attribution_core.pipeline import build_task, resolve

    require_task(cfg)
    resolved = resolve(cfg)
    suite = load_suite(cfg.evaluation.suite)
    tid = target_id(as_measurement(cfg.target))
    if tid not in suite.targets:
        raise ConfigError(
            f"target: {tid!r} is not held by suite {str(suite.path)!r}; it holds "
            f"{', '.join(suite.targets)} — set `target` to one of them (e.g. --set target=...)"
        )
    check_lds_block(cfg, suite)
    task = build_task(resolved)
    check_masks(suite, task.n_train)
    data = cfg.model_dump(exclude_none=True)
    data["model"] = {
        "seed": suite.meta["config"]["model"]["seed"],
        "path": str(suite.path / "base" / "model.safetensors"),
    }
    data["queries"] = {
        "source": "file",
        "path": str(out / "suite_queries.npz"),
        "count": int(suite.meta["n_query"]),
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".suite_queries.tmp.npz"
    np.savez(tmp, **load_query_arrays(suite.path / "queries"))
    tmp.replace(out / "suite_queries.npz")
    return suite, tid, load_config(data)


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
    from attribution_core.pipeline import attribute, build_method, build_task, load_queries, resolve
    from attribution_core.report.render import write_report

    cfg = load_config(config, overrides)
    out = Path(out)
    suite, tid, bound = prepare(cfg, out)
    t0 = time.perf_counter()
    resolved = resolve(bound)
    # oracle scorers (exact retraining) are evaluated from the suite's oracle models: no training
    oracle_labels = {
        m.label
        for m in resolved.methods
        if getattr(resolved.registry.get("scorer", m.scorer_name).factory, "uses_oracle", False)
    }
    entries = [e for e in bound.methods if label_of(e) not in oracle_labels]
    if entries:
        result = attribute(
            bound.model_copy(update={"methods": entries}), out=out, progress=progress
        )
        task, queries, scores_by, manifests = (
            result.task,
            result.queries,
            result.scores,
            result.manifests,
        )
    else:
        task = build_task(resolved)
        queries = load_queries(task, task.build_model(0), bound)
        scores_by, manifests = {}, {}
    truth = suite.truth(tid)
    masks = torch.as_tensor(suite.masks)
    idx = L.bootstrap_indices(truth.shape[0], n_boot, seed=cfg.seed)
    rows, boots, per_query = [], {}, {}
    for i, method in enumerate(resolved.methods):
        scorer = build_method(resolved, method, task, i)
        t1 = time.perf_counter()
        if method.label in oracle_labels:
            scores = torch.zeros(suite.masks.shape[1], truth.shape[2], dtype=torch.float64)
            oracle = torch.as_tensor(suite.oracle(tid), dtype=torch.float64)
            full = torch.as_tensor(suite.full(tid), dtype=torch.float64).mean(dim=0)
            pred = scorer.predict_subsets(masks, scores, oracle=oracle - full)
            seconds = time.perf_counter() - t1
            atomic_write_json(
                out / method.label / "manifest.json",
                {
                    "label": method.label,
                    "identity": {
                        "method": method.describe(),
                        "suite": str(suite.path),
                        "target": tid,
                    },
                    "note": "predictions = the suite's oracle models (fresh seed per subset) minus the "
                    "mean of its full-data models; no scores.npy (leave-one-out retraining not run)",
                    "timings": {"total": seconds},
                },
            )
        else:
            scores = torch.as_tensor(scores_by[method.label], dtype=torch.float64)
            pred = scorer.predict_subsets(masks, scores)
            seconds = float(manifests[method.label]["timings"].get("total", math.nan))
        pred = pred.detach().cpu().numpy().astype(np.float64)
        atomic_save_npy(out / method.label / "predictions.npy", pred)
        s = L.summarize(pred, truth, idx)
        boots[method.label] = s.pop("boot")
        per_query[method.label] = s.pop("per_query").tolist()
        rows.append(
            {
                "label": method.label,
                "method": method.name,
                "target": tid,
                "damping": damping_of(method),
                **s,
                "seconds": seconds,
            }
        )
    table = pd.DataFrame(rows, columns=LDS_COLUMNS)
    table.to_csv(out / "lds.csv", index=False)
    pair = pd.DataFrame(L.pairwise(boots, {r["label"]: r["lds_mean"] for r in rows}))
    pair.to_csv(out / "pairwise.csv", index=False)
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
        "lds": suite.meta["lds"],
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
