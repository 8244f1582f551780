"""The counterfactual's retraining plan and the ``counterfactual.csv`` rows its results make.

:mod:`attribution_core.evaluation.counterfactual` settles a :class:`CounterfactualSetup`, plans
the runs with :func:`plan_removals`, retrains them and turns the stored results into rows with
:func:`table_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attribution_core.config import CounterfactualConfig, MeasurementConfig, RunConfig
from attribution_core.evaluation.bench import scorer_of
from attribution_core.evaluation.runs import Run, target_id
from attribution_core.evaluation.single import SINGLE
from attribution_core.evaluation.suite import TRUTH_SEED

if TYPE_CHECKING:
    from attribution_core.pipeline import AttributionResult, Resolved

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

SINGLE_COLUMNS = ["protocol", "predicted_change"]
"""Added under the single-model protocol: every change is deterministic (one retraining with the
base model's seed, stderr 0) and ``predicted_change`` is the method's own first-order prediction
of the top removal (``predict_subsets``, with the factor ``1 − removed_weight``)."""


@dataclass(frozen=True)
class CounterfactualSetup:
    """What is settled before any work: the methods with scores and how their runs retrain.

    Attributes:
        cf: the counterfactual settings (defaults when the config has none).
        resolved: the resolved run, restricted to the methods with scores.
        task: the task when already built (by the suite or the single-model check), else None.
        protocol: ``distributional`` or ``single-model`` (the suite's, else the config's).
        removed_weight: weight of the removed examples in a retraining (0 = removal).
        generation: ``(count, seed)`` of the queries' generation with ``regenerate``, else None.
        skipped: labels of the oracle methods left out (no per-example ranking to remove from).
        train_cfg: the config the retrainings use (as many steps as training on all of D).
        switched: whether ``train_cfg`` changed task options to get that step count.
        target: the measurement whose change is reported.
    """

    cf: CounterfactualConfig
    resolved: Resolved
    task: Any
    protocol: str
    removed_weight: float
    generation: tuple[int, int] | None
    skipped: set[str]
    train_cfg: RunConfig
    switched: bool
    target: MeasurementConfig


@dataclass(frozen=True)
class RemovalPlan:
    """The retrainings, named ``full-seed<k>``, ``random-q<q>-seed<k>``, ``<label>-q<q>-seed<k>``.

    Attributes:
        n: training examples N.
        nq: queries evaluated (the first ``nq``).
        removed: examples removed per run, ``max(1, ⌊remove_fraction · N⌋)``.
        seeds: training seeds S; every removal (and the full data) is retrained once per seed.
        top: label -> per query, the ``removed`` most positively scored training indices.
        runs: every run under its name (before :func:`counterfactual._file_id` renames it).
    """

    n: int
    nq: int
    removed: int
    seeds: list[int]
    top: dict[str, list[tuple[int, ...]]]
    runs: list[Run]


def plan_removals(
    cfg: RunConfig, setup: CounterfactualSetup, result: AttributionResult
) -> RemovalPlan:
    """Full-data runs, one random removal per query (shared by all methods) and each method's
    top removal per query, each under every seed; ``result`` holds the scores ``(N, Q)``."""
    cf = setup.cf
    n = result.task.n_train
    nq = min(cf.queries, next(iter(result.scores.values())).shape[1])
    k_remove = max(1, int(np.floor(cf.remove_fraction * n)))
    rng = np.random.default_rng([cfg.seed, 17])
    random_sets = [
        tuple(sorted(rng.choice(n, k_remove, replace=False).tolist())) for _ in range(nq)
    ]
    top = {
        m.label: [
            tuple(np.argsort(-result.scores[m.label][:, q], kind="stable")[:k_remove].tolist())
            for q in range(nq)
        ]
        for m in setup.resolved.methods
    }
    # single-model: one deterministic retraining per removal, with the base model's seed
    seeds = (
        [setup.resolved.config.model.seed]
        if setup.protocol == SINGLE
        else [TRUTH_SEED + k for k in range(cf.seeds)]
    )
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
    return RemovalPlan(n, nq, k_remove, seeds, top, runs)


def predicted_changes(
    result: AttributionResult, setup: CounterfactualSetup, plan: RemovalPlan
) -> dict[str, np.ndarray]:
    """Each method's predicted change for its own top removal of each query, ``(nq,)``."""
    resolved, r = setup.resolved, setup.removed_weight
    out = {}
    for i, m in enumerate(resolved.methods):
        scorer = scorer_of(result, m, resolved.registry, result.task, i)
        scores = torch.from_numpy(np.array(result.scores[m.label], dtype=np.float64))
        masks = torch.ones(len(plan.top[m.label]), plan.n, dtype=torch.bool)
        for q, removed in enumerate(plan.top[m.label]):
            masks[q, list(removed)] = False
        pred = scorer.predict_subsets(masks, scores, **({"removed_weight": r} if r else {}))
        out[m.label] = pred.diagonal().detach().cpu().numpy()
    return out


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def table_rows(
    setup: CounterfactualSetup,
    plan: RemovalPlan,
    results: dict[str, np.ndarray],
    predicted: dict[str, np.ndarray] | None,
) -> list[dict[str, Any]]:
    """One row per method and query (:data:`CF_COLUMNS`, plus the regenerate and single-model
    columns): the target's change after the top and the random removal, against the full-data
    models of the same seeds, mean ± s.e. over seeds.

    Args:
        results: run name -> stored result ``(rows, 2, nq)``: row 0 the target, row 1 the pixel
            distance (``regenerate`` only); value and Monte-Carlo s.e.; per query.
        predicted: :func:`predicted_changes` under the single-model protocol, else None.
    """
    tid, n_seeds = target_id(setup.target), len(plan.seeds)

    def values(prefix: str, q: int, row: int = 0) -> np.ndarray:
        return np.array([results[f"{prefix}-seed{k}"][row, 0, q] for k in range(n_seeds)])

    full = np.stack([results[f"full-seed{k}"][0, 0] for k in range(n_seeds)])  # (S, nq)
    rows = []
    for m in setup.resolved.methods:
        for q in range(plan.nq):
            d_top = values(f"{m.label}-q{q}", q) - full[:, q]
            d_rand = values(f"random-q{q}", q) - full[:, q]
            (tm, ts), (rm, rs) = _mean_se(d_top), _mean_se(d_rand)
            rows.append(
                {
                    "label": m.label,
                    "method": m.name,
                    "target": tid,
                    "query": q,
                    "removed": plan.removed,
                    "change_mean": tm,
                    "change_stderr": ts,
                    "random_mean": rm,
                    "random_stderr": rs,
                    "top_minus_random": float((d_top - d_rand).mean()),
                    "n_seeds": n_seeds,
                }
            )
            if predicted is not None:  # deterministic effects; the method's own prediction
                rows[-1].update(change_stderr=0.0, random_stderr=0.0, protocol=setup.protocol)
                rows[-1]["predicted_change"] = float(predicted[m.label][q])
            if setup.generation:  # pixel distances: row 1 of every run file
                dists = [values(p, q, 1) for p in (f"{m.label}-q{q}", f"random-q{q}", "full")]
                for name, d in zip(("top", "random", "full"), dists, strict=True):
                    rows[-1][f"regen_{name}_mean"], rows[-1][f"regen_{name}_stderr"] = _mean_se(d)
    return rows
