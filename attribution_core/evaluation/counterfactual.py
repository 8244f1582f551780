"""Retraining without top influences (paper appendix D).

For the first ``queries`` queries and every method: remove the ``⌊remove_fraction · N⌋`` most
positively scored training examples, retrain ``seeds`` models (seeds ``TRUTH_SEED + k``, paired
with ``seeds`` full-data models trained here with the same seeds) and report the target's change
``m(θ_{D∖S}, k) − m(θ_D, k)`` (mean ± s.e. over seeds) next to an equal-size random removal
(one random set per query, shared by all methods).  A larger increase is better.

Training uses the same step count as full training: if the task has a ``scale_steps`` option
(fewer steps for less data), it is switched off for these retrainings.  Runs are stored one file
per model under ``DIR/counterfactual/runs`` (resumable like ``suite build``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attribution_core.config import (
    CounterfactualConfig,
    RunConfig,
    as_measurement,
    label_of,
    load_config,
)
from attribution_core.errors import ConfigError
from attribution_core.evaluation.executors import make_executor
from attribution_core.evaluation.runs import (
    Job,
    Run,
    RunStore,
    execute,
    save_query_batch,
    target_id,
)
from attribution_core.evaluation.suite import TRUTH_SEED
from attribution_core.interfaces import index_batch
from attribution_core.storage import atomic_write_json

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


def _same_steps(cfg: RunConfig, registry: Any) -> tuple[RunConfig, bool]:
    opts = registry.get("task", cfg.task.name).options
    if opts is not None and "scale_steps" in opts.model_fields:
        data = cfg.model_dump(exclude_none=True)
        data["task"]["scale_steps"] = False
        return load_config(data), True
    return cfg, False


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def counterfactual(
    config: str | Path | dict[str, Any] | RunConfig,
    out: str | Path,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = False,
) -> pd.DataFrame:
    """Score every method (resuming ``bench``/``attribute`` output in ``out``), then retrain.

    Returns:
        The ``counterfactual.csv`` table (one row per method and query).
    """
    from attribution_core.evaluation.bench import prepare
    from attribution_core.pipeline import attribute, resolve

    cfg = load_config(config, overrides)
    cf = cfg.evaluation.counterfactual or CounterfactualConfig()
    out = Path(out)
    bound = prepare(cfg, out)[2] if cfg.evaluation.suite else cfg
    resolved = resolve(bound)
    # oracle scorers (exact retraining) have no per-example ranking to remove from: skipped
    skipped = [
        m.label
        for m in resolved.methods
        if getattr(resolved.registry.get("scorer", m.scorer_name).factory, "uses_oracle", False)
    ]
    if len(skipped) == len(resolved.methods):
        raise ConfigError(
            "methods: counterfactual needs a method with scores; "
            f"{', '.join(skipped)} only predict subsets from retrained models"
        )
    bound = bound.model_copy(
        update={"methods": [e for e in bound.methods if label_of(e) not in skipped]}
    )
    resolved = resolve(bound)
    train_cfg, switched = _same_steps(bound, resolved.registry)
    result = attribute(bound, out=out, progress=progress)
    n = result.task.n_train
    nq = min(cf.queries, next(iter(result.scores.values())).shape[1])
    k_remove = max(1, int(np.floor(cf.remove_fraction * n)))
    queries = index_batch(result.queries, slice(0, nq))
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
    seeds = [TRUTH_SEED + k for k in range(cf.seeds)]
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
    store = RunStore(out / "counterfactual" / "runs", (1, 2, nq))
    dump = train_cfg.model_dump(mode="json")

    def make_job(group: tuple[Run, ...]) -> Job:
        return Job(
            dump, (target.model_dump(),), str(qpath.resolve()), group, 0.0, cfg.seed, cfg.threads
        )

    executor = make_executor(cfg, resolved.registry)
    batch = cfg.evaluation.lds.batch if cfg.evaluation.lds else 8
    res = execute(runs, store, make_job, executor, batch, desc="counterfactual", progress=progress)

    def values(prefix: str, q: int) -> np.ndarray:
        return np.array([res[f"{prefix}-seed{k}"][0, 0, q] for k in range(cf.seeds)])

    full = np.stack([res[f"full-seed{k}"][0, 0] for k in range(cf.seeds)])  # (S, nq)
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
                    "n_seeds": cf.seeds,
                }
            )
    table = pd.DataFrame(rows, columns=CF_COLUMNS)
    table.to_csv(out / "counterfactual.csv", index=False)
    atomic_write_json(
        out / "counterfactual" / "info.json",
        {
            "remove_fraction": cf.remove_fraction,
            "removed": k_remove,
            "seeds": seeds,
            "queries": nq,
            "same_steps_as_full": True,
            "scale_steps_switched_off": switched,
            "target": tid,
            "skipped_oracle_methods": skipped,
        },
    )
    if (out / "bench.json").is_file():
        from attribution_core.report.render import write_report

        write_report(out)
    return table
