"""``--dry-run``: the plan of ``attribute``, ``bench`` and ``suite build`` (:mod:`.plan`).

Everything is validated exactly as the real command does (same resolution, same suite checks,
same input files read), then sizes are taken from the task's data, the untrained model and the
config; a short probe measures one per-example forward+backward. Nothing is trained or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from attribution_core.config import LDSConfig, RunConfig, load_config
from attribution_core.evaluation import single
from attribution_core.evaluation.bench import open_suite
from attribution_core.evaluation.runs import target_id
from attribution_core.evaluation.suite import check_targets, draw_masks, kept_count, require_task
from attribution_core.evaluation.suite_checks import check_masks, check_task
from attribution_core.models import load_model
from attribution_core.pipeline import Resolved, build_task, load_queries, resolve
from attribution_core.plan import (
    PhaseEstimate,
    RunPlan,
    measured_probe,
    memory_budget,
    model_sizes,
    plan_methods,
    resident_bytes,
)
from attribution_core.records import Phase

Source = str | Path | dict[str, Any] | RunConfig


def _n_query(resolved: Resolved, task: Any, model: Any) -> int:
    """Queries the run would score: the config's count; a query file is read (and checked)."""
    q = resolved.config.queries
    if q.source == "file":
        queries = load_queries(task, model, resolved.config)
        return int(next(iter(queries.values())).shape[0])
    return min(q.count, task.n_train) if q.source == "train" else q.count


def plan_run(
    resolved: Resolved,
    task: Any,
    *,
    command: str,
    n_query: int | None = None,
    model_path: str | None = None,
    probe: bool = True,
    skip: set[str] = frozenset(),  # type: ignore[assignment]
) -> RunPlan:
    """The plan of ``resolved``'s methods on ``task`` (model built untrained, or loaded)."""
    cfg = resolved.config
    torch.set_num_threads(cfg.threads)  # as the real command: the probe's rate depends on it
    path = model_path or cfg.model.path
    model = load_model(task, path, cfg.model.seed) if path else task.build_model(cfg.model.seed)
    model.eval()
    nq = n_query if n_query is not None else _n_query(resolved, task, model)
    sizes = model_sizes(task, model, nq, cfg.chunk_size)
    baseline = resident_bytes()
    pr = measured_probe(resolved, task, model) if probe else None
    methods, phases = plan_methods(resolved, task, sizes, baseline=baseline, pr=pr, skip=skip)
    return RunPlan(command, sizes, methods, phases, baseline, memory_budget(), pr)


def plan_attribute(config: Source, overrides: tuple[str, ...] = ()) -> RunPlan:
    """The plan of ``attribution attribute``."""
    resolved = resolve(load_config(config, overrides))
    return plan_run(resolved, build_task(resolved), command="attribute")


def plan_bench(config: Source, overrides: tuple[str, ...] = ()) -> RunPlan:
    """The plan of ``attribution bench`` (the suite verified, its model and sizes used)."""
    cfg = load_config(config, overrides)
    require_task(cfg)
    resolved = resolve(cfg)
    suite, _ = open_suite(cfg)
    task = build_task(resolved)
    check_masks(suite, task.n_train)
    check_task(suite.meta, suite.path, task)
    oracle = resolved.oracle_labels()
    plan = plan_run(
        resolved,
        task,
        command="bench",
        n_query=int(suite.meta["n_query"]),
        model_path=str(suite.path / "base" / "model.safetensors"),
        skip=oracle,
    )
    for label in sorted(oracle):
        m, q = suite.masks.shape[0], plan.sizes.n_query
        ph = Phase("oracle_predictions", 0, (m, q), m * q * 8, "read from the suite (no training)")
        plan.phases.append(PhaseEstimate(label, ph, plan.baseline_bytes + ph.bytes, 0.0, "-"))
    return plan


def plan_suite(config: Source, overrides: tuple[str, ...] = ()) -> RunPlan:
    """The plan of ``attribution suite build``: one training per retrained model."""
    cfg = load_config(config, overrides)
    require_task(cfg)
    resolved = resolve(cfg)
    targets = check_targets(cfg, resolved.registry)
    lds = cfg.evaluation.lds or LDSConfig()
    task = build_task(resolved)
    draw_masks(task.n_train, 2, lds.kept_fraction, cfg.seed)  # checks ⌊αN⌋ before work
    is_single = lds.protocol == single.SINGLE
    if is_single:
        single.check_single_model(cfg, task, resolved.registry, targets)
    plan = plan_run(resolved.only([]), task, command="suite build", n_query=cfg.queries.count)
    models = lds.subsets * (lds.seeds + 1) + lds.seeds + 1
    what = f"{lds.subsets} subsets x ({lds.seeds} seeds + oracle) + {lds.seeds} full-data + base"
    if is_single:
        runs = single.runs_of(
            np.zeros((lds.subsets, task.n_train), bool), lds, 0, cfg.evaluation.loo
        )
        models = len(runs) + 1
        cross = min(single.CROSS_MASKS, lds.subsets)
        what = (
            f"single-model: {lds.subsets} subsets + base"
            + (f", {lds.cross_seeds} cross seed(s) x (full + {cross})" if lds.cross_seeds else "")
            + (f" + {task.n_train} leave-one-out" if cfg.evaluation.loo else "")
        )
    steps = _training_rows(task)
    n_params, T = plan.sizes.n_params, plan.sizes.train_steps
    pr = plan.probe
    state = 4 * n_params * plan.sizes.itemsize  # parameters, gradients, two optimizer moments
    act = pr.bytes_per_row * min(steps[1], task.n_train) if pr else 0
    by_step = T > 0 and pr is not None and pr.seconds_per_step is not None
    each = f"{T} training steps" if by_step else f"{steps[0]} example forward+backwards"
    ph = Phase(
        "retraining",
        models * (T if by_step else steps[0]),
        (lds.batch, n_params),
        lds.batch * (state + act),
        f"{models} models ({what}), {lds.batch} at a time; {each} each; targets: "
        f"{', '.join(target_id(t) for t in targets)}",
        cost="training-step" if by_step else "batched",
    )
    seconds = pr.seconds(ph) if pr else None
    plan.phases.append(
        PhaseEstimate("suite", ph, plan.baseline_bytes + ph.bytes, seconds, "evaluation.lds.batch")
    )
    plan.methods["suite"] = {
        "masks": [lds.subsets, task.n_train],
        "kept": kept_count(lds.kept_fraction, task.n_train),
    }
    plan.notes.append(
        "retraining time = models x T x the measured seconds of one training step (an upper "
        "bound where scale_steps shortens the half-data runs; measurement not included)"
        if by_step
        else "retraining time = models x (train_steps x batch_size) x the measured per-example "
        "rate (an upper bound: training batches cost less per example than per-example gradients)"
    )
    return plan


def _training_rows(task: Any) -> tuple[int, int]:
    """``(examples processed per training run, batch size)`` from the task's description
    (``train_steps`` x ``batch_size`` where it records them, else one pass over the data)."""
    d = task.describe() if hasattr(task, "describe") else {}
    steps, batch = d.get("train_steps"), d.get("batch_size")
    if isinstance(steps, int) and isinstance(batch, int):
        return steps * batch, batch
    return task.n_train, task.n_train
