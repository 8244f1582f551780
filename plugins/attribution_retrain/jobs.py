"""Batched, resumable retraining: named models trained through ``task.train_ensemble`` and an
:class:`attribution_core.Executor`, each finished measurement stored atomically.

A *model* is named by its training seed and the examples it leaves out (``seed3-full``,
``seed3-loo17``, ``seed1000003-mask-<sha>``). Its result is the run's target measured on every
query with fixed common-random-number draws: ``(n_query,)`` float64, stored as
``<root>/<name>.npy``. A name whose file exists is never retrained (resume unit = one model).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attribution_core import (
    Batch,
    Executor,
    Measurement,
    Task,
    atomic_save_npy,
    atomic_write_json,
    batch_size,
    index_batch,
)


@dataclass(frozen=True)
class ModelSpec:
    """One model: ``weights: (N,)`` (1 kept, 0 removed), trained from ``seed``, named ``name``."""

    name: str
    seed: int
    weights: np.ndarray


@dataclass(frozen=True)
class JobEnv:
    """What every job measures with: the task, target, queries and their fixed draws."""

    task: Task
    target: Measurement
    queries: Batch
    noise: Batch
    chunk_size: int = 64


@dataclass(frozen=True)
class Job:
    """Models trained together by one ``train_ensemble`` call (one seed, ``M`` weight rows).

    Self-contained and picklable (it carries its :class:`JobEnv`), so executors that leave the
    process (Ray) can run :func:`run_job` on it.
    """

    seed: int
    names: tuple[str, ...]
    weights: np.ndarray  # (M, N)
    env: JobEnv


def fingerprint(batch: Batch) -> str:
    """Short SHA-256 of a batch's names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for k in sorted(batch):
        t = batch[k].detach().cpu().contiguous()
        h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def mask_name(seed: int, kept: np.ndarray) -> str:
    """Name of the model trained on the kept examples of a boolean mask ``(N,)``."""
    digest = hashlib.sha256(np.packbits(kept.astype(bool)).tobytes()).hexdigest()[:16]
    return f"seed{seed}-mask-{digest}-n{int(kept.sum())}"


@torch.no_grad()
def measure(
    model: nn.Module, target: Measurement, queries: Batch, noise: Batch, chunk_size: int
) -> np.ndarray:
    """``m(θ, x'_q)`` for every query, with the given (common-random-number) noise: ``(Q,)``."""
    n = batch_size(queries)
    out = []
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        out.append(target.evaluate(model, index_batch(queries, rows), index_batch(noise, rows)))
    return torch.cat(out).detach().cpu().double().numpy()


def run_job(job: Job) -> np.ndarray:
    """Train ``job``'s models with one ``train_ensemble`` call and measure them: ``(M, Q)``."""
    env = job.env
    weights = torch.as_tensor(job.weights, dtype=env.task.dtype)
    models = env.task.train_ensemble(weights, [job.seed] * len(job.names))
    return np.stack(
        [measure(m.eval(), env.target, env.queries, env.noise, env.chunk_size) for m in models]
    )


class RetrainStore:
    """Folder of finished measurements ``<root>/<name>.npy`` plus ``key.json`` (what they measure).

    ``root = None`` keeps results in memory only (no resume).
    """

    def __init__(self, root: str | Path | None, key_parts: dict[str, Any]) -> None:
        self.root = None if root is None else Path(root)
        self.memory: dict[str, np.ndarray] = {}
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            key_file = self.root / "key.json"
            if not key_file.is_file():
                atomic_write_json(key_file, key_parts)

    def get(self, name: str, n_query: int) -> np.ndarray | None:
        """The stored ``(Q,)`` result of ``name``, or None if absent or malformed."""
        if name in self.memory:
            return self.memory[name]
        if self.root is None:
            return None
        path = self.root / f"{name}.npy"
        if not path.is_file():
            return None
        try:
            arr = np.load(path)
        except (OSError, ValueError):
            return None
        return arr if arr.shape == (n_query,) else None

    def put(self, name: str, values: np.ndarray) -> None:
        """Store one model's result (atomically on disk)."""
        self.memory[name] = values
        if self.root is not None:
            atomic_save_npy(self.root / f"{name}.npy", values)


def retrain(
    specs: Sequence[ModelSpec],
    *,
    task: Task,
    target: Measurement,
    queries: Batch,
    noise: Batch,
    store: RetrainStore,
    executor: Executor,
    models_per_job: int,
    chunk_size: int = 64,
    progress: bool = False,
    desc: str = "retraining",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Results of every spec, training only those not yet in ``store``.

    Returns:
        ``(name -> (Q,) measurements, stats)``; stats: models trained / reused, wall seconds,
        wall seconds per trained model, CPU seconds of this process.
    """
    n_query = batch_size(queries)
    results: dict[str, np.ndarray] = {}
    todo: dict[int, list[ModelSpec]] = {}
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            continue
        seen.add(spec.name)
        done = store.get(spec.name, n_query)
        if done is not None:
            results[spec.name] = done
        else:
            todo.setdefault(spec.seed, []).append(spec)
    env = JobEnv(task, target, queries, noise, chunk_size)
    jobs = [
        Job(seed, tuple(s.name for s in group), np.stack([s.weights for s in group]), env)
        for seed, group_all in todo.items()
        for group in (
            group_all[i : i + models_per_job] for i in range(0, len(group_all), models_per_job)
        )
    ]
    t0, c0 = time.perf_counter(), time.process_time()
    trained = 0
    for i, values in executor.map(run_job, jobs, desc=desc, progress=progress):
        for name, row in zip(jobs[i].names, np.asarray(values), strict=True):
            store.put(name, row)
            results[name] = row
            trained += 1
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = {
        "models_trained": trained,
        "models_reused": len(seen) - trained,
        "jobs": len(jobs),
        "seconds": seconds,
        "seconds_per_model": seconds / trained if trained else None,
        # CPU time of this process (all its threads); jobs run elsewhere (Ray) are not included
        "process_cpu_seconds": cpu,
    }
    return results, stats


def key_parts(task: Task, target: Measurement, queries: Batch, noise_seed: int) -> dict[str, Any]:
    """What a stored result depends on besides its name (task, target, queries, draws)."""
    return json.loads(
        json.dumps(
            {
                "task": task.describe(),
                "dtype": str(task.dtype),
                "target": target.describe(),
                "queries": fingerprint(queries),
                "noise_seed": noise_seed,
            },
            default=str,
            sort_keys=True,
        )
    )
