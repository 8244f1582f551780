"""The distributional protocol's retrainings of a suite: every subset under ``S`` fresh seeds.

Seeds: subset ``m`` seed ``k`` and full-data seed ``k`` use ``TRUTH_SEED + k`` (paired across
subsets); the oracle of subset ``m`` uses ``ORACLE_SEED + m`` (used nowhere else).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from attribution_core.config import LDSConfig, MeasurementConfig, RunConfig
from attribution_core.evaluation.runs import Job, Run, RunStore, execute
from attribution_core.storage import atomic_save_npy

TRUTH_SEED = 1_000
ORACLE_SEED = 100_000


def distributional_arrays(
    cfg: RunConfig,
    out: Path,
    masks: np.ndarray,
    targets: list[MeasurementConfig],
    tids: list[str],
    n_query: int,
    executor: Any,
    progress: bool,
) -> None:
    """Retrain (resumably) every subset × seed, the oracles and the full-data models; write
    ``truth/``, ``oracle/`` and ``full/``."""
    lds = cfg.evaluation.lds or LDSConfig()
    qpath = out / "queries"
    removed = [tuple(np.flatnonzero(~m).tolist()) for m in masks]
    runs = [Run(f"full-seed{k}", (), TRUTH_SEED + k) for k in range(lds.seeds)]
    for m in range(
        lds.subsets
    ):  # a subset's models are adjacent: a partial build has whole subsets
        runs += [
            Run(f"subset{m:04d}-seed{k}", removed[m], TRUTH_SEED + k) for k in range(lds.seeds)
        ]
        runs.append(Run(f"subset{m:04d}-oracle", removed[m], ORACLE_SEED + m))
    store = RunStore(out / "runs", (len(tids), 2, n_query))
    config_dump = cfg.model_dump(mode="json")

    def make_job(group: tuple[Run, ...]) -> Job:
        return Job(
            config_dump,
            tuple(t.model_dump() for t in targets),
            str(qpath.resolve()),
            group,
            lds.removed_weight,
            cfg.seed,
            cfg.threads,
        )

    results = execute(runs, store, make_job, executor, lds.batch, desc="suite", progress=progress)
    for i, tid in enumerate(tids):
        truth = np.stack(
            [
                np.stack([results[f"subset{m:04d}-seed{k}"][i] for k in range(lds.seeds)], axis=1)
                for m in range(lds.subsets)
            ]
        )  # (M, 2, S, Q)
        atomic_save_npy(out / "truth" / f"{tid}.npy", truth[:, 0])
        atomic_save_npy(out / "truth" / f"{tid}.stderr.npy", truth[:, 1])
        oracle = np.stack([results[f"subset{m:04d}-oracle"][i] for m in range(lds.subsets)])
        atomic_save_npy(out / "oracle" / f"{tid}.npy", oracle[:, 0])
        atomic_save_npy(out / "oracle" / f"{tid}.stderr.npy", oracle[:, 1])
        full = np.stack([results[f"full-seed{k}"][i] for k in range(lds.seeds)])
        atomic_save_npy(out / "full" / f"{tid}.npy", full[:, 0])
        atomic_save_npy(out / "full" / f"{tid}.stderr.npy", full[:, 1])
