"""The single-model protocol of suites and benches (issue 17).

A *single-model* suite asks what **this** model learned from x_j: every retraining starts from
the base model's initialisation, replays the base model's whole draw stream for its step count
and only changes the per-example weights (removed examples keep their minibatch slots with weight
``removed_weight``) — :func:`attribution_core.single_model.train_single_model`. The base model is
the full-data run of the same code path; there are no oracle models (they would equal the truth
bit for bit, so ``exact-retraining`` scores 1 by construction) and one "seed" per subset.

Suite arrays (besides ``masks.npy``, ``base/`` and ``queries/``)::

    truth/<tid>.npy          (M, 1, Q) target on each retrained model (all 2S draws)
    truth/<tid>.stderr.npy   (M, 1, Q) its Monte-Carlo standard error over the draws
    truth/<tid>.halves.npy   (M, 2, Q) means over the first and second S draws (the ceiling)
    full/<tid>.npy           (1, Q) the base model (+ .stderr.npy)
    cross/<tid>.npy          (M', K, Q) the first M' = min(32, M) masks under K other seeds
    cross/<tid>.full.npy     (K, Q) the full-data model of each other seed
    loo/<tid>.npy            (N, Q) leave-one-out models (``evaluation.loo: true``)

Cross seeds: the k-th is the k-th of ``CROSS_SEED, CROSS_SEED + 1, …`` that is not the base
seed; scope ``stream`` keeps the base initialisation and changes the draw stream, scope
``init+stream`` changes both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from attribution_core.build import build_measurement
from attribution_core.config import LDSConfig, MeasurementConfig, RunConfig
from attribution_core.errors import ConfigError
from attribution_core.evaluation import lds as L
from attribution_core.evaluation.runs import (
    Job,
    Run,
    RunStore,
    execute,
    load_query_arrays,
    load_query_batch,
    measure_split,
)
from attribution_core.models import load_model
from attribution_core.single_model import require_training_steps, train_single_model
from attribution_core.storage import atomic_save_npy

SINGLE = "single-model"
CROSS_SEED = 2_000
CROSS_MASKS = 32
LOSS_MIN_DRAWS = 256
ORACLE_NOTE = (
    "single-model protocol: no oracle models — a retraining with the base seed equals the "
    "truth bit for bit, so exact-retraining scores 1.000 by construction (its predictions are "
    "the truth minus the base model)"
)


def protocol_of(meta: dict[str, Any]) -> str:
    """A suite's protocol from its ``suite.json`` (suites built before issue 17: distributional)."""
    return str(meta.get("protocol", "distributional"))


def split_draw_line(tid: str, r: dict[str, float]) -> str:
    """One line of ``suite build``'s summary for a single-model target."""
    rel = r["reliability"]
    flag = "  [too noisy to rank methods]" if rel == rel and rel < 0.3 else ""
    return (
        f"{tid}: split-draw r {r['split_draw_r']:.3f}, reliability (all draws) {rel:.3f}, "
        f"ceiling {r['ceiling']:.3f}{flag}"
    )


def check_single_model(
    cfg: RunConfig, task: Any, registry: Any, targets: list[MeasurementConfig]
) -> None:
    """Everything a single-model suite needs, checked before any work.

    Raises:
        ConfigError: the task has no training-step hook (names it), ``model.path`` is set (the
            base model must be the full-data run of the single-model path), ``seeds`` ≠ 1, or a
            ``loss`` target with fewer than 256 draws (and no ``timesteps: all``).
    """
    require_training_steps(task, "evaluation.lds.protocol: single-model")
    lds = cfg.evaluation.lds or LDSConfig()
    if "seeds" in lds.model_fields_set and lds.seeds != 1:
        raise ConfigError(
            f"evaluation.lds.seeds: {lds.seeds} with protocol: single-model; every retraining "
            f"uses the base model's seed, so a subset has exactly one model — remove `seeds` "
            f"(or set it to 1)"
        )
    if cfg.model.path:
        raise ConfigError(
            f"model.path: {cfg.model.path!r} with protocol: single-model; the base model must be "
            f"the full-data run of the single-model training path (trained from model.seed "
            f"here, equal bit for bit to Task.train's) — remove model.path"
        )
    key = "evaluation.targets" if cfg.evaluation.targets else "target"
    for i, t in enumerate(targets):
        if t.name != "loss":
            continue
        m = build_measurement(registry, task, t, "target")
        draws = getattr(m, "n_samples", None)
        if draws is not None and getattr(m, "timesteps", None) != "all" and draws < LOSS_MIN_DRAWS:
            where = f"{key}[{i}]" if key == "evaluation.targets" else key
            raise ConfigError(
                f"{where}: loss with {draws} (t, ε) draws in a single-model suite; its truth is "
                f"deterministic but for these draws, so use n_samples ≥ {LOSS_MIN_DRAWS} (e.g. "
                f"{{name: loss, n_samples: {LOSS_MIN_DRAWS}}}) or timesteps: all"
            )


def cross_seed_pairs(lds: LDSConfig, base_seed: int) -> list[tuple[int, int]]:
    """``(initialisation seed, stream seed)`` of each of the ``cross_seeds`` other seeds."""
    others = [s for s in range(CROSS_SEED, CROSS_SEED + lds.cross_seeds + 1) if s != base_seed]
    init = lds.cross_seed_scope != "stream"
    return [(s if init else base_seed, s) for s in others[: lds.cross_seeds]]


def identity(lds: LDSConfig) -> dict[str, Any]:
    """What single-model adds to a suite's identity (a change is refused, not grown)."""
    return {"protocol": SINGLE, "cross_seed_scope": lds.cross_seed_scope}


def meta_of(cfg: RunConfig, lds: LDSConfig) -> dict[str, Any]:
    """The ``suite.json`` entries of a single-model suite (merged over the distributional)."""
    base = cfg.model.seed
    pairs = cross_seed_pairs(lds, base)
    return {
        "protocol": SINGLE,
        "loo": cfg.evaluation.loo,
        "lds": {
            "subsets": lds.subsets,
            "seeds": 1,
            "kept_fraction": lds.kept_fraction,
            "removed_weight": lds.removed_weight,
            "protocol": SINGLE,
            "cross_seeds": lds.cross_seeds,
            "cross_seed_scope": lds.cross_seed_scope,
        },
        "cross": {"masks": min(CROSS_MASKS, lds.subsets), "seeds": [list(p) for p in pairs]},
    }


def seeds_of(cfg: RunConfig, lds: LDSConfig) -> dict[str, Any]:
    """The ``seeds`` entry of a single-model suite's ``suite.json``."""
    base = cfg.model.seed
    return {
        "masks": cfg.seed,
        "noise": cfg.seed,
        "base_model": base,
        "queries": cfg.queries.seed,
        "truth": [base],
        "full": [base],
        "oracle": None,
        "cross": [list(p) for p in cross_seed_pairs(lds, base)],
    }


def train_base(task: Any, seed: int) -> torch.nn.Module:
    """The base model: the full-data run of the single-model path (all weights 1)."""
    return train_single_model(task, torch.ones(task.n_train, dtype=torch.float64), seed)


def runs_of(masks: np.ndarray, lds: LDSConfig, base_seed: int, loo: bool) -> list[Run]:
    """Every retraining of a single-model suite, in a fixed order (subsets, cross, loo)."""
    removed = [tuple(np.flatnonzero(~m).tolist()) for m in masks]
    runs = [Run(f"subset{m:04d}", removed[m], base_seed) for m in range(len(masks))]
    n_cross = min(CROSS_MASKS, len(masks))
    for k, (init, stream) in enumerate(cross_seed_pairs(lds, base_seed)):
        runs.append(Run(f"cross{k}-full", (), init, stream))
        runs += [Run(f"cross{k}-subset{m:04d}", removed[m], init, stream) for m in range(n_cross)]
    if loo:
        runs += [Run(f"loo{j:05d}", (j,), base_seed) for j in range(masks.shape[1])]
    return runs


def build_arrays(
    cfg: RunConfig,
    out: Path,
    built: tuple[Any, Any, list[MeasurementConfig], list[str]],
    masks: np.ndarray,
    executor: Any,
    progress: bool,
) -> dict[str, dict[str, float]]:
    """Retrain (resumably), write the arrays of the module docstring; the reliability per target.

    Args:
        built: ``(task, registry, targets, target ids)`` of the suite.

    The base model's own measurement is stored as the run ``full-base`` (measured here, from
    ``base/model.safetensors``), so a resumed build does not re-measure it.
    """
    task, registry, targets, tids = built
    lds = cfg.evaluation.lds or LDSConfig()
    qpath = out / "queries"
    n_query = int(next(iter(load_query_arrays(qpath).values())).shape[0])
    store = RunStore(out / "runs", (len(tids), 4, n_query))
    if store.load("full-base") is None:
        model = load_model(task, out / "base" / "model.safetensors", cfg.model.seed).eval()
        queries = load_query_batch(qpath, task)
        measured = [build_measurement(registry, task, t, "target") for t in targets]
        values = [measure_split(model, m, queries, cfg.seed) for m in measured]
        store.save("full-base", np.stack(values))
    runs = runs_of(masks, lds, cfg.model.seed, cfg.evaluation.loo)
    config_dump = cfg.model_dump(mode="json")
    target_dumps = tuple(t.model_dump() for t in targets)

    def make_job(group: tuple[Run, ...]) -> Job:
        return Job(
            config_dump,
            target_dumps,
            str(qpath.resolve()),
            group,
            lds.removed_weight,
            cfg.seed,
            cfg.threads,
            protocol=SINGLE,
            split_draws=True,
        )

    results = execute(runs, store, make_job, executor, lds.batch, desc="suite", progress=progress)
    results["full-base"] = store.load("full-base")
    return _write_arrays(out, results, tids, masks, lds, cfg.evaluation.loo)


def _write_arrays(
    out: Path,
    results: dict[str, np.ndarray],
    tids: list[str],
    masks: np.ndarray,
    lds: LDSConfig,
    loo: bool,
) -> dict[str, dict[str, float]]:
    n_sub, n_cross = len(masks), min(CROSS_MASKS, len(masks))
    reliability = {}
    for i, tid in enumerate(tids):
        truth = np.stack([results[f"subset{m:04d}"][i] for m in range(n_sub)])  # (M, 4, Q)
        atomic_save_npy(out / "truth" / f"{tid}.npy", truth[:, None, 0])
        atomic_save_npy(out / "truth" / f"{tid}.stderr.npy", truth[:, None, 1])
        atomic_save_npy(out / "truth" / f"{tid}.halves.npy", truth[:, 2:4])
        full = results["full-base"][i]
        atomic_save_npy(out / "full" / f"{tid}.npy", full[None, 0])
        atomic_save_npy(out / "full" / f"{tid}.stderr.npy", full[None, 1])
        if lds.cross_seeds:
            cross = np.stack(
                [
                    np.stack(
                        [results[f"cross{k}-subset{m:04d}"][i, 0] for k in range(lds.cross_seeds)]
                    )
                    for m in range(n_cross)
                ]
            )  # (M', K, Q)
            cfull = np.stack([results[f"cross{k}-full"][i, 0] for k in range(lds.cross_seeds)])
            atomic_save_npy(out / "cross" / f"{tid}.npy", cross)
            atomic_save_npy(out / "cross" / f"{tid}.full.npy", cfull)
        if loo:
            values = np.stack([results[f"loo{j:05d}"][i, 0] for j in range(masks.shape[1])])
            atomic_save_npy(out / "loo" / f"{tid}.npy", values)
        reliability[tid] = L.split_draw_reliability(truth[:, 2:4])
    return reliability


# ---- bench ---------------------------------------------------------------------------------
def oracle_predictions(suite: Any, tid: str) -> np.ndarray:
    """``(M, Q)`` exact retraining under single-model: the truth minus the base model."""
    return suite.truth(tid)[:, 0] - suite.full(tid).mean(axis=0)


def loo_predictions(suite: Any, tid: str) -> np.ndarray | None:
    """``(M, Q)`` additive leave-one-out: Σ over each mask's removed examples of
    ``m(θ_{D∖j}) − m(θ_D)`` (None without ``loo/``)."""
    path = suite.path / "loo" / f"{tid}.npy"
    if not path.is_file():
        return None
    effects = np.load(path) - suite.full(tid).mean(axis=0)
    return (~suite.masks).astype(np.float64) @ effects


def cross_columns(pred: np.ndarray, suite: Any, tid: str) -> dict[str, float]:
    """``lds_cross_seed`` (± s.e. over queries) against the cross seeds' truth on the first
    ``M'`` masks and ``lds_cross_masks``, the same-seed LDS on those masks (NaN if not built)."""
    nan = float("nan")
    path = suite.path / "cross" / f"{tid}.npy"
    if not path.is_file():
        return {"lds_cross_seed": nan, "lds_cross_seed_stderr": nan, "lds_cross_masks": nan}
    cross = np.load(path)  # (M', K, Q)
    m = cross.shape[0]
    per_q = L.lds_per_query(pred[:m], cross)
    same = L.lds_per_query(pred[:m], suite.truth(tid)[:m])
    q = per_q.shape[0]
    return {
        "lds_cross_seed": float(per_q.mean()),
        "lds_cross_seed_stderr": float(per_q.std(ddof=1) / np.sqrt(q)) if q > 1 else nan,
        "lds_cross_masks": float(same.mean()),
    }
