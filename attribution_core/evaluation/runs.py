"""Retraining jobs shared by ``suite build`` and ``counterfactual``: train, measure, store.

A *run* is one retrained model: per-example ``weights: (N,)`` and a training ``seed``. Runs are
grouped into jobs of up to ``batch`` models (one ``Task.train_ensemble`` call each, one executor
job); every finished run is stored as one atomically written file
``runs/<run-id>.npy: (n_targets, 2, n_query)`` float64 — row 0 the target values, row 1 their
Monte-Carlo standard errors.  A file exists only once complete (temp file + fsync + rename), so
a killed build resumes by retraining exactly the runs whose files are missing.

With ``Job.regenerate`` (counterfactual option ``regenerate``) each run file has one more row,
``(n_targets + 1, 2, n_query)``: the last holds the pixel distance of the query regenerated from
the same noise (:mod:`attribution_core.evaluation.regenerate`) and zeros (it is exact); the
regenerated ``x`` goes to ``runs/<run-id>.samples.npy``, written before the run file, so a
finished run always has it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attribution_core.build import build_measurement
from attribution_core.config import DTYPES, MeasurementConfig, RunConfig
from attribution_core.evaluation.regenerate import pixel_distance, regenerate
from attribution_core.gradients import example_noise
from attribution_core.interfaces import Batch, Measurement, Task, batch_size
from attribution_core.registry import Registry, get_registry
from attribution_core.single_model import train_single_model
from attribution_core.storage import atomic_save_npy, atomic_write_json


@dataclass(frozen=True)
class Run:
    """One model to retrain: ``run_id`` names its file; ``removed`` lists dropped examples.

    ``stream_seed`` (single-model protocol only): the draw stream's seed when it differs from
    the initialisation's ``seed`` (cross-seed transfer with scope ``stream``).
    """

    run_id: str
    removed: tuple[int, ...]
    seed: int
    stream_seed: int | None = None


@dataclass(frozen=True)
class Job:
    """A picklable unit of work for an executor: train ``runs`` at once and measure them.

    Attributes:
        config: the run config as JSON-able dict (the task and targets are rebuilt from it).
        targets: target measurement configs (name + options), in storage order.
        queries_path: folder of the query batch (:func:`save_query_batch`).
        runs: the models to train in this job.
        removed_weight: weight of removed examples (0 = removal, 0.5 = down-weighting).
        noise_seed: seed of the common random numbers of every target.
        threads: torch intra-op threads inside the job (pinned for repeatability).
        regenerate: ``(count, seed)`` of the queries' generation: also regenerate them from the
            same noise with every retrained model and store the pixel distance (None = off).
        protocol: ``distributional`` (one ``Task.train_ensemble`` call) or ``single-model``
            (each run alone through the training-step hook,
            :func:`~attribution_core.single_model.train_single_model`).
        split_draws: store two more rows per target, the means over the first and the second
            half of the target's draws (:func:`measure_split`; the split-draw ceiling).
    """

    config: dict[str, Any]
    targets: tuple[dict[str, Any], ...]
    queries_path: str
    runs: tuple[Run, ...]
    removed_weight: float
    noise_seed: int
    threads: int
    regenerate: tuple[int, int] | None = None
    protocol: str = "distributional"
    split_draws: bool = False


_TASKS: dict[str, Task] = {}


def target_id(ref: MeasurementConfig | dict[str, Any] | str) -> str:
    """File-name id of a target: ``loss``, ``timestep-loss-t500``, ``neg-elbo-n_samples16``."""
    if isinstance(ref, str):
        return ref
    data = ref.model_dump() if isinstance(ref, MeasurementConfig) else dict(ref)
    name = data.pop("name")
    parts = [
        f"{k}{'-'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted(data.items())
    ]
    return "-".join([name, *parts])


QUERY_FILES = {"x": "samples", "trajectory": "trajectories"}


def save_query_batch(directory: Path, queries: Batch) -> None:
    """One ``.npy`` per query tensor (``x`` → ``samples.npy``, ``trajectory`` →
    ``trajectories.npy``, else ``<key>.npy``) and ``keys.json`` mapping keys to files."""
    directory = Path(directory)
    files = {}
    for k, v in queries.items():
        files[k] = f"{QUERY_FILES.get(k, k)}.npy"
        atomic_save_npy(directory / files[k], v.detach().cpu().numpy())
    atomic_write_json(directory / "keys.json", files)


def load_query_arrays(directory: Path) -> dict[str, np.ndarray]:
    """The arrays saved by :func:`save_query_batch`."""
    directory = Path(directory)
    files = json.loads((directory / "keys.json").read_text())
    return {k: np.load(directory / f) for k, f in files.items()}


def load_query_batch(directory: str | Path, task: Task) -> Batch:
    """The query batch saved by :func:`save_query_batch`, on the task's device and dtypes."""
    train = task.train_data()
    return {
        k: torch.as_tensor(v).to(device=task.device, dtype=train[k].dtype if k in train else None)
        for k, v in load_query_arrays(Path(directory)).items()
    }


def measure(model: torch.nn.Module, target: Measurement, queries: Batch, seed: int) -> np.ndarray:
    """``(2, Q)`` float64: the target on every query and its Monte-Carlo standard error.

    The noise comes from :func:`example_noise` with ``(seed, "target", query index)``, so every
    model sees the same draws per query (common random numbers).  The value is
    ``target.evaluate`` on all draws; the standard error is ``std(per-draw values) / √S``
    (each draw evaluated alone, slicing the draw axis 1 of every noise tensor; 0 when S = 1).
    Measurements exposing ``per_draw(forward, batch, noise) -> (B, S)`` (mean over S =
    ``evaluate``) are evaluated once and both numbers come from those per-draw values.
    """
    noise = example_noise(target, queries, seed, "target", 0)
    with torch.no_grad():
        per_draw = getattr(target, "per_draw", None)
        if per_draw is not None and noise:  # (B, S) values in one forward pass
            per = per_draw(model, queries, noise).double().cpu().numpy()
            if per.ndim == 2 and per.shape[0] == n_queries(queries):
                se = (
                    per.std(axis=1, ddof=1) / np.sqrt(per.shape[1])
                    if per.shape[1] > 1
                    else 0 * per[:, 0]
                )
                return np.stack([per.mean(axis=1), se])
        value = target.evaluate(model, queries, noise).double().cpu().numpy()
        n_draws = next(iter(noise.values())).shape[1] if noise else 1
        stderr = np.zeros_like(value)
        if n_draws > 1:
            per = np.stack(
                [
                    target.evaluate(model, queries, {k: v[:, s : s + 1] for k, v in noise.items()})
                    .double()
                    .cpu()
                    .numpy()
                    for s in range(n_draws)
                ]
            )
            stderr = per.std(axis=0, ddof=1) / np.sqrt(n_draws)
    return np.stack([value, stderr])


def _task(config: dict[str, Any]) -> tuple[Task, Registry]:
    """The job's task, built from the run config's ``task`` section only (cached per process)."""
    key = json.dumps(config, sort_keys=True, default=str)
    registry = get_registry()
    if key not in _TASKS:
        _TASKS.clear()
        cfg = RunConfig.model_validate(config)
        options = registry.validate_options("task", cfg.task.name, cfg.task.options, where="task")
        _TASKS[key] = registry.get("task", cfg.task.name).factory(
            dtype=DTYPES[cfg.dtype], device=torch.device(cfg.device), **options
        )
    return _TASKS[key], registry


def measure_split(
    model: torch.nn.Module, target: Measurement, queries: Batch, seed: int
) -> np.ndarray:
    """``(4, Q)`` float64: :func:`measure`'s two rows, then the means over the first and the
    second half of the draws (``⌊S/2⌋`` each, same common random numbers).

    The halves give the split-draw reliability of a deterministic (single-model) truth:
    Spearman across subsets between the halves, Spearman–Brown-corrected to all S draws.
    A deterministic target (no noise) has identical halves; a single draw gives NaN halves.
    """
    rows = measure(model, target, queries, seed)
    noise = example_noise(target, queries, seed, "target", 0)
    if not noise:
        return np.concatenate([rows, rows[:1], rows[:1]])
    n_draws = next(iter(noise.values())).shape[1]
    half = n_draws // 2
    if half == 0:
        return np.concatenate([rows, np.full((2, rows.shape[1]), np.nan)])
    with torch.no_grad():
        per_draw = getattr(target, "per_draw", None)
        per = per_draw(model, queries, noise) if per_draw is not None else None
        if per is None or per.ndim != 2 or per.shape[0] != n_queries(queries):
            parts = [
                target.evaluate(model, queries, {k: v[:, s : s + 1] for k, v in noise.items()})
                for s in range(2 * half)
            ]
            per = torch.stack(parts, dim=1)
        per_np = per.double().cpu().numpy()
    halves = np.stack([per_np[:, :half].mean(axis=1), per_np[:, half : 2 * half].mean(axis=1)])
    return np.concatenate([rows, halves])


def run_weights(run: Run, n: int, removed_weight: float, dtype: torch.dtype) -> torch.Tensor:
    """``(N,)`` training weights of ``run``: 1, and ``removed_weight`` at its removed examples."""
    weights = torch.ones(n, dtype=dtype)
    weights[list(run.removed)] = removed_weight
    return weights


def _trained(job: Job, task: Task) -> Iterator[torch.nn.Module]:
    """The job's models in run order: one ``train_ensemble`` call (distributional), or one
    single-model retraining at a time (``single-model``: seed = initialisation and stream)."""
    n = task.n_train
    if job.protocol == "single-model":
        for run in job.runs:
            weights = run_weights(run, n, job.removed_weight, torch.float64)
            yield train_single_model(task, weights, run.seed, stream_seed=run.stream_seed)
        return
    weights = torch.stack([run_weights(r, n, job.removed_weight, task.dtype) for r in job.runs])
    yield from task.train_ensemble(weights, [r.seed for r in job.runs])


def run_job(job: Job) -> dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Train every run of ``job`` (see :func:`_trained`) and measure every target.

    Returns:
        ``run_id -> (n_targets, 2, Q)`` float64 (values and Monte-Carlo standard errors;
        ``(n_targets, 4, Q)`` with ``job.split_draws``); with ``job.regenerate``:
        ``run_id -> ((n_targets + 1, 2, Q), x_regen: (Q, ...))``.
    """
    torch.set_num_threads(job.threads)
    task, registry = _task(job.config)
    queries = load_query_batch(job.queries_path, task)
    targets = [
        build_measurement(registry, task, MeasurementConfig.model_validate(t), "target")
        for t in job.targets
    ]
    how = measure_split if job.split_draws else measure
    out: dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]] = {}
    for run, model in zip(job.runs, _trained(job, task), strict=True):
        model.eval()
        values = np.stack([how(model, t, queries, job.noise_seed) for t in targets])
        if job.regenerate is None:
            out[run.run_id] = values
            continue
        x = regenerate(task, model, n_queries(queries), *job.regenerate)
        dist = pixel_distance(x, queries["x"])
        row = np.stack([dist, np.zeros_like(dist)])[None]
        out[run.run_id] = (np.concatenate([values, row]), x.cpu().numpy())
    return out


class RunStore:
    """``runs/<run-id>.npy`` files: which runs are finished, and atomic saving of new ones."""

    def __init__(self, directory: Path, shape: tuple[int, ...]) -> None:
        self.directory = Path(directory)
        self.shape = shape
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".*.tmp*"):  # left by a killed writer: never finished
            stale.unlink(missing_ok=True)

    def path(self, run_id: str) -> Path:
        """File of ``run_id``."""
        return self.directory / f"{run_id}.npy"

    def load(self, run_id: str) -> np.ndarray | None:
        """The stored result, or None if absent or unreadable / of the wrong shape."""
        p = self.path(run_id)
        if not p.is_file():
            return None
        try:
            arr = np.load(p)
        except (ValueError, OSError, EOFError):
            return None
        return arr if arr.shape == self.shape else None

    def save(self, run_id: str, result: np.ndarray, samples: np.ndarray | None = None) -> None:
        """Atomically write a finished run (never overwrites a finished file); ``samples``
        (regenerated queries) are written first, so a finished run always has them."""
        if self.load(run_id) is None:
            if samples is not None:
                atomic_save_npy(self.samples_path(run_id), samples)
            atomic_save_npy(self.path(run_id), result)

    def samples_path(self, run_id: str) -> Path:
        """Regenerated queries of ``run_id`` (``Job.regenerate``)."""
        return self.directory / f"{run_id}.samples.npy"

    def load_samples(self, run_id: str) -> np.ndarray | None:
        """The regenerated queries ``(Q, ...)`` of a finished run, or None."""
        p = self.samples_path(run_id)
        return np.load(p) if p.is_file() and self.load(run_id) is not None else None


def execute(
    runs: list[Run],
    store: RunStore,
    make_job: Any,
    executor: Any,
    batch: int,
    *,
    desc: str = "retraining",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Train the runs whose files are missing (in fixed groups of ``batch``) and load all.

    Groups are cut from the full, ordered run list, so a resumed build trains the same groups
    (bitwise-identical results for batched tasks); a group is skipped only when all its runs
    are stored, and only missing files are written.
    """
    groups = [tuple(runs[i : i + batch]) for i in range(0, len(runs), batch)]
    todo = [g for g in groups if any(store.load(r.run_id) is None for r in g)]
    jobs = [make_job(g) for g in todo]
    for _, result in executor.map(run_job, jobs, desc=desc, progress=progress):
        for run_id, arr in result.items():
            values, samples = arr if isinstance(arr, tuple) else (arr, None)
            store.save(run_id, values, samples)
    out = {}
    for r in runs:
        arr = store.load(r.run_id)
        if arr is None:  # pragma: no cover - only if the filesystem lost a write
            raise RuntimeError(f"run {r.run_id} finished but its file is missing")
        out[r.run_id] = arr
    return out


def n_queries(queries: Batch) -> int:
    """Number of queries in a batch."""
    return batch_size(queries)
