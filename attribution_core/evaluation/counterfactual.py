"""Retraining without top influences (paper appendix D).

For the first ``queries`` queries and every method: remove the ``⌊remove_fraction · N⌋`` most
positively scored training examples, retrain ``seeds`` models (seeds ``TRUTH_SEED + k``, paired
with ``seeds`` full-data models trained here with the same seeds) and report the target's change
``m(θ_{D∖S}, k) − m(θ_D, k)`` (mean ± s.e. over seeds) next to an equal-size random removal
(one random set per query, shared by all methods).  A larger increase is better.

Training uses the same step count as full training: if the task has a ``scale_steps`` option
(fewer steps for less data), it is switched off for these retrainings.  Runs are stored one file
per model under ``DIR/counterfactual/runs`` (resumable like ``suite build``).

With ``regenerate: true`` (generated queries only) every retrained model — top removal, random
removal and full data — also regenerates the queries from the same sampling noise, and the
table gains the pixel distance ``‖x_regen − x_q‖₂`` (:mod:`attribution_core.evaluation.regenerate`;
mean ± s.e. over seeds) for each; the full-data distance is the seed-noise baseline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from attribution_core.builtin.executors import make_executor
from attribution_core.config import (
    CounterfactualConfig,
    LDSConfig,
    RunConfig,
    as_measurement,
    load_config,
)
from attribution_core.errors import ConfigError
from attribution_core.evaluation import regenerate as R
from attribution_core.evaluation.bench import prepare, scorer_of
from attribution_core.evaluation.runs import (
    Job,
    Run,
    RunStore,
    execute,
    save_query_batch,
    target_id,
)
from attribution_core.evaluation.single import SINGLE
from attribution_core.evaluation.suite import TRUTH_SEED
from attribution_core.interfaces import index_batch
from attribution_core.locking import command_locks
from attribution_core.outputs import require_full_scores
from attribution_core.pipeline import attribute, build_task, resolve
from attribution_core.report.render import write_report
from attribution_core.single_model import require_training_steps
from attribution_core.storage import atomic_save_npy, atomic_to_csv, atomic_write_json

CF_COLUMNS = [
    "label",
    "method",
    "target",
    "query",
    "removed",
    "change_mean",
    "change_stderr",
    "random_mean",
    "random_stderr",
    "top_minus_random",
    "n_seeds",
]
REGEN_COLUMNS = [
    "regen_top_mean",
    "regen_top_stderr",
    "regen_random_mean",
    "regen_random_stderr",
    "regen_full_mean",
    "regen_full_stderr",
]
"""Pixel distance of the regenerated query (``regenerate: true``): after top removal, after
random removal, and for the full-data models (the seed-noise baseline)."""


def _same_steps(cfg: RunConfig, registry: Any) -> tuple[RunConfig, bool]:
    """``cfg`` with the task options under which a retraining on a subset takes as many steps
    as training on all of D (the task's ``full_step_options`` hook), and whether they changed.

    Only the options the hook changed are written into the config, so the run digests of a
    task without such options (or with them already set) stay what they were.
    """
    name = cfg.task.name
    options = registry.validate_options("task", name, cfg.task.options, where="task")
    factory = registry.get("task", name).factory
    full_step_options = getattr(factory, "full_step_options", dict)
    changed = {k: v for k, v in full_step_options(options).items() if options.get(k) != v}
    if not changed:
        return cfg, False
    data = cfg.model_dump(exclude_none=True)
    data["task"].update(changed)
    return load_config(data), True


SINGLE_COLUMNS = ["protocol", "predicted_change"]
"""Added under the single-model protocol: every change is deterministic (one retraining with the
base model's seed, stderr 0) and ``predicted_change`` is the method's own first-order prediction
of the top removal (``predict_subsets``, with the factor ``1 − removed_weight``)."""


def _protocol(cfg: RunConfig, suite: Any) -> tuple[str, float]:
    """``(protocol, removed weight)`` of the retrainings: the suite's when one is given, else the
    config's ``evaluation.lds``; distributional retrainings always remove (weight 0)."""
    if suite is not None:
        protocol, r = suite.protocol, float(suite.meta["lds"].get("removed_weight", 0.0))
    else:
        lds = cfg.evaluation.lds or LDSConfig()
        protocol, r = lds.protocol, lds.removed_weight
    return protocol, (r if protocol == SINGLE else 0.0)


def _predicted(
    result: Any, resolved: Any, top: dict[str, list[tuple[int, ...]]], n: int, r: float
) -> dict[str, np.ndarray]:
    """Each method's predicted change for its own top removal of each query, ``(nq,)``."""
    out = {}
    for i, m in enumerate(resolved.methods):
        scorer = scorer_of(result, m, resolved.registry, result.task, i)
        scores = torch.from_numpy(np.array(result.scores[m.label], dtype=np.float64))
        masks = torch.ones(len(top[m.label]), n, dtype=torch.bool)
        for q, removed in enumerate(top[m.label]):
            masks[q, list(removed)] = False
        pred = scorer.predict_subsets(masks, scores, **({"removed_weight": r} if r else {}))
        out[m.label] = pred.diagonal().detach().cpu().numpy()
    return out


def _file_id(run: Run, context: list[Any]) -> str:
    """``<name>-<digest>``: the run's name plus a digest of what defines its result."""
    key = json.dumps([context, list(run.removed), run.seed], sort_keys=True, default=str)
    return f"{run.run_id}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def _regen_info(
    task: Any,
    store: RunStore,
    queries: Any,
    labels: list[str],
    nq: int,
    out: Path,
    generation: tuple[int, int],
    file_of: dict[str, str],
) -> dict[str, Any]:
    """Save the grid images (``counterfactual/regenerated.npy``) and describe them for info.json."""
    grid = R.regenerated_images(task, store, queries, labels, nq, file_of)
    if grid is not None:
        atomic_save_npy(out / "counterfactual" / "regenerated.npy", grid[0])
    return {
        "regenerate": True,
        "regenerate_generation": {"count": generation[0], "seed": generation[1]},
        "regenerated_columns": grid[1] if grid is not None else None,
    }


def counterfactual(
    config: str | Path | dict[str, Any] | RunConfig,
    out: str | Path,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = False,
) -> pd.DataFrame:
    """Score every method (resuming ``bench``/``attribute`` output in ``out``), then retrain.

    Returns:
        The ``counterfactual.csv`` table (one row per method and query; with ``regenerate``
        also the :data:`REGEN_COLUMNS`).

    Raises:
        ConfigError: only oracle methods, or ``regenerate`` with queries that were not generated
            (checked before any work).
    """
    cfg = load_config(config, overrides)
    require_full_scores(cfg.topk, "counterfactual")
    out = Path(out)
    with command_locks(out, cfg.evaluation.suite):
        return _counterfactual(cfg, out, progress)


def _counterfactual(cfg: RunConfig, out: Path, progress: bool) -> pd.DataFrame:
    cf = cfg.evaluation.counterfactual or CounterfactualConfig()
    suite, task = None, None
    if cfg.evaluation.suite:
        suite, _, resolved, task = prepare(cfg, out)
    else:
        resolved = resolve(cfg)
    bound = resolved.config
    protocol, removed_weight = _protocol(cfg, suite)
    if protocol == SINGLE:  # the training-step hook, before any work
        task = task if task is not None else build_task(resolved)
        require_training_steps(task, "counterfactual with protocol: single-model")
    generation = None
    if cf.regenerate:  # (count, seed) of the queries' generation, before any work
        generation = (
            R.generation_of(suite.meta["config"]["queries"], f"suite {str(suite.path)!r}")
            if suite is not None
            else R.generation_of(cfg.queries.model_dump(), "the config")
        )
    # oracle scorers (exact retraining) have no per-example ranking to remove from: skipped
    skipped = resolved.oracle_labels()
    if len(skipped) == len(resolved.methods):
        raise ConfigError(
            "methods: counterfactual needs a method with scores; "
            f"{', '.join(sorted(skipped))} only predict subsets from retrained models"
        )
    resolved = resolved.only([m.label for m in resolved.methods if m.label not in skipped])
    bound = resolved.config
    train_cfg, switched = _same_steps(bound, resolved.registry)
    result = attribute(resolved, out=out, progress=progress, task=task)
    n = result.task.n_train
    nq = min(cf.queries, next(iter(result.scores.values())).shape[1])
    k_remove = max(1, int(np.floor(cf.remove_fraction * n)))
    queries = index_batch(result.queries, slice(0, nq))
    base_distance = (
        R.check_base(result.task, result.model, queries, *generation) if generation else None
    )
    qpath = out / "counterfactual" / "queries"
    save_query_batch(qpath, queries)
    target = as_measurement(cfg.target)
    tid = target_id(target)

    rng = np.random.default_rng([cfg.seed, 17])
    random_sets = [
        tuple(sorted(rng.choice(n, k_remove, replace=False).tolist())) for _ in range(nq)
    ]
    top = {
        m.label: [
            tuple(np.argsort(-result.scores[m.label][:, q], kind="stable")[:k_remove].tolist())
            for q in range(nq)
        ]
        for m in resolved.methods
    }
    # single-model: one deterministic retraining per removal, with the base model's seed
    seeds = [bound.model.seed] if protocol == SINGLE else [TRUTH_SEED + k for k in range(cf.seeds)]
    runs = [Run(f"full-seed{k}", (), s) for k, s in enumerate(seeds)]
    runs += [
        Run(f"random-q{q}-seed{k}", random_sets[q], s)
        for q in range(nq)
        for k, s in enumerate(seeds)
    ]
    runs += [
        Run(f"{label}-q{q}-seed{k}", sets[q], s)
        for label, sets in top.items()
        for q in range(nq)
        for k, s in enumerate(seeds)
    ]
    # regenerate: one more row per run file (pixel distances), so toggling it retrains
    store = RunStore(out / "counterfactual" / "runs", (1 + bool(generation), 2, nq))
    dump = train_cfg.model_dump(mode="json")
    # a run's file name carries a digest of everything that defines it (removed set, seed,
    # training config, target, regeneration), so a re-run with other settings or rescored
    # methods trains new files instead of silently reusing stale ones
    defining = [
        dump["task"],
        dump["dtype"],
        dump["device"],
        cfg.seed,
        target.model_dump(),
        generation,
    ] + ([protocol, removed_weight] if protocol == SINGLE else [])
    file_of = {r.run_id: _file_id(r, defining) for r in runs}
    runs = [Run(file_of[r.run_id], r.removed, r.seed) for r in runs]

    def make_job(group: tuple[Run, ...]) -> Job:
        return Job(
            dump,
            (target.model_dump(),),
            str(qpath.resolve()),
            group,
            removed_weight,
            cfg.seed,
            cfg.threads,
            generation,
            protocol=protocol,
        )

    executor = make_executor(cfg, resolved.registry)
    batch = cfg.evaluation.lds.batch if cfg.evaluation.lds else 8
    stored = execute(
        runs, store, make_job, executor, batch, desc="counterfactual", progress=progress
    )
    res = {name: stored[fid] for name, fid in file_of.items()}

    def values(prefix: str, q: int, row: int = 0) -> np.ndarray:
        return np.array([res[f"{prefix}-seed{k}"][row, 0, q] for k in range(len(seeds))])

    full = np.stack([res[f"full-seed{k}"][0, 0] for k in range(len(seeds))])  # (S, nq)
    predicted = _predicted(result, resolved, top, n, removed_weight) if protocol == SINGLE else None
    rows = []
    for m in resolved.methods:
        for q in range(nq):
            d_top = values(f"{m.label}-q{q}", q) - full[:, q]
            d_rand = values(f"random-q{q}", q) - full[:, q]
            (tm, ts), (rm, rs) = _mean_se(d_top), _mean_se(d_rand)
            rows.append(
                {
                    "label": m.label,
                    "method": m.name,
                    "target": tid,
                    "query": q,
                    "removed": k_remove,
                    "change_mean": tm,
                    "change_stderr": ts,
                    "random_mean": rm,
                    "random_stderr": rs,
                    "top_minus_random": float((d_top - d_rand).mean()),
                    "n_seeds": len(seeds),
                }
            )
            if predicted is not None:  # deterministic effects; the method's own prediction
                rows[-1].update(change_stderr=0.0, random_stderr=0.0, protocol=protocol)
                rows[-1]["predicted_change"] = float(predicted[m.label][q])
            if generation:  # pixel distances: row 1 of every run file
                dists = [values(p, q, 1) for p in (f"{m.label}-q{q}", f"random-q{q}", "full")]
                for name, d in zip(("top", "random", "full"), dists, strict=True):
                    rows[-1][f"regen_{name}_mean"], rows[-1][f"regen_{name}_stderr"] = _mean_se(d)
    extra = SINGLE_COLUMNS if protocol == SINGLE else []
    table = pd.DataFrame(rows, columns=CF_COLUMNS + (REGEN_COLUMNS if generation else []) + extra)
    atomic_to_csv(out / "counterfactual.csv", table)
    regen: dict[str, Any] = {"regenerate": False}
    if generation is not None and base_distance is not None:
        regen = _regen_info(result.task, store, queries, list(top), nq, out, generation, file_of)
        regen["regenerate_base_distance"] = base_distance.tolist()
    atomic_write_json(
        out / "counterfactual" / "info.json",
        {
            "remove_fraction": cf.remove_fraction,
            "protocol": protocol,
            "removed_weight": removed_weight,
            "removed": k_remove,
            "seeds": seeds,
            "queries": nq,
            "same_steps_as_full": True,
            "scale_steps_switched_off": switched,
            "target": tid,
            "skipped_oracle_methods": skipped,
            **regen,
        },
    )
    if (out / "bench.json").is_file():
        write_report(out)
    return table
