"""Pinned suites: build (resumable) and load the ground truth of LDS.

Layout (``docs/evaluation.md``)::

    suite.json                 config, seeds, versions, command, targets, reliability
    base/model.safetensors     the model trained on all of D (seed ``model.seed``)
    queries/samples.npy        (Q, ...) queries; trajectories.npy where kept; keys.json
    masks.npy                  (M, N) bool, True = kept; exactly ⌊αN⌋ kept per row
    truth/<tid>.npy            (M, S, Q) target on each retrained model
    truth/<tid>.stderr.npy     (M, S, Q) its Monte-Carlo standard error
    oracle/<tid>.npy           (M, Q) one more model per subset, fresh seed (+ .stderr.npy)
    full/<tid>.npy             (S, Q) models trained on all of D (+ .stderr.npy)
    runs/<run-id>.npy          one atomically written file per finished retraining

Masks are drawn row by row from one seeded stream and seeds do not depend on the suite's size,
so ``--set evaluation.lds.subsets=…``/``seeds=…`` on an existing suite *grows* it, reusing every
finished run (the identity check covers everything else).

Seeds: subset ``m`` seed ``k`` and full-data seed ``k`` use ``TRUTH_SEED + k`` (paired across
subsets); the oracle of subset ``m`` uses ``ORACLE_SEED + m`` (used nowhere else).

``evaluation.lds.protocol: single-model`` builds a single-model suite instead (one retraining per
subset with the base model's seed, split-draw halves, optional cross seeds and leave-one-out
models, no oracle): :mod:`attribution_core.evaluation.single`. ``suite.json`` records the
protocol; suites without the record are distributional.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attribution_core.builtin.executors import make_executor
from attribution_core.config import (
    LDSConfig,
    MeasurementConfig,
    RunConfig,
    as_measurement,
    load_config,
)
from attribution_core.errors import ConfigError, DataError
from attribution_core.evaluation import single
from attribution_core.evaluation.distributional import (
    ORACLE_SEED,
    TRUTH_SEED,
    distributional_arrays,
)
from attribution_core.evaluation.lds import reliability
from attribution_core.evaluation.runs import (
    load_query_arrays,
    save_query_batch,
    target_id,
)
from attribution_core.evaluation.suite_checks import (
    LDS_KEYS,
    as_json,
    check_task,
)
from attribution_core.integrity import hash_suite, verify_suite
from attribution_core.locking import directory_lock
from attribution_core.pipeline import (
    build_task,
    load_or_train_model,
    load_queries,
    resolve,
    versions,
)
from attribution_core.storage import atomic_save_npy, atomic_write_json, save_tensors


@dataclass
class Suite:
    """A loaded suite: metadata and arrays (loaded lazily per target)."""

    path: Path
    meta: dict[str, Any]
    masks: np.ndarray

    @property
    def targets(self) -> list[str]:
        """Target ids the suite holds."""
        return list(self.meta["targets"])

    @property
    def protocol(self) -> str:
        """``distributional`` or ``single-model`` (recorded at build time)."""
        return single.protocol_of(self.meta)

    def _load(self, folder: str, tid: str, suffix: str = "") -> np.ndarray:
        if tid not in self.meta["targets"]:
            raise ConfigError(
                f"target: {tid!r} is not held by suite {str(self.path)!r}; it holds "
                f"{', '.join(self.targets)} — set `target` to one of them or rebuild the suite "
                f"with it in evaluation.targets"
            )
        path = self.path / folder / f"{tid}{suffix}.npy"
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(
                f"evaluation.suite: {str(path)!r} is not a readable .npy ({exc}); restore the "
                f"suite or rebuild it with its command: {self.meta.get('command')}"
            ) from None

    def truth(self, tid: str) -> np.ndarray:
        """``(M, S, Q)`` measured targets."""
        return self._load("truth", tid)

    def oracle(self, tid: str) -> np.ndarray:
        """``(M, Q)`` oracle models (fresh seed per subset)."""
        return self._load("oracle", tid)

    def full(self, tid: str) -> np.ndarray:
        """``(S, Q)`` full-data models."""
        return self._load("full", tid)

    def halves(self, tid: str) -> np.ndarray:
        """``(M, 2, Q)`` single-model truth over each half of its draws (split-draw ceiling)."""
        return self._load("truth", tid, ".halves")


def load_suite(
    path: str | Path | None, *, key: str = "evaluation.suite", verify: bool = True
) -> Suite:
    """Load a suite directory, or raise a :class:`DataError` naming what is missing.

    With ``verify`` (default) every file is checked against the sizes and sha256 hashes in
    ``suite.json`` first (:func:`attribution_core.integrity.verify_suite`).
    """
    if path is None:
        raise ConfigError(
            f"{key}: no suite given; set it to a suite directory (e.g. benchmarks/suites/digits2-ddpm) "
            f"or build one with `attribution suite build CONFIG --out SUITE`"
        )
    p = Path(path)
    meta_path = p / "suite.json"
    if not meta_path.is_file():
        raise DataError(
            f"{key}: {str(p)!r} is not a suite (no suite.json); build it with "
            f"`attribution suite build CONFIG --out {p}` or fix the path"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError) as exc:
        raise DataError(f"{key}: {str(meta_path)!r} is not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("status") != "complete":
        command = meta.get("command") if isinstance(meta, dict) else None
        raise DataError(
            f"{key}: suite {str(p)!r} is incomplete (build interrupted); re-run its command to "
            f"resume: {command or 'attribution suite build ...'}"
        )
    if verify:
        verify_suite(p, meta, key=key)
    try:
        masks = np.load(p / "masks.npy")
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{key}: {str(p / 'masks.npy')!r} is not a readable .npy ({exc})") from None
    return Suite(p, meta, masks)


def suite_targets(cfg: RunConfig) -> list[MeasurementConfig]:
    """The targets a suite built from ``cfg`` measures: ``evaluation.targets`` or ``[target]``."""
    refs = cfg.evaluation.targets or [cfg.target]
    return [as_measurement(r) for r in refs]


def check_targets(cfg: RunConfig, registry: Any) -> list[MeasurementConfig]:
    """The suite's targets, each validated (name, options, usable as a target)."""
    targets = suite_targets(cfg)
    for i, t in enumerate(targets):
        comp = registry.get("measurement", t.name, where=f"evaluation.targets[{i}]")
        registry.validate_options(
            "measurement", t.name, t.options, where=f"evaluation.targets[{i}]"
        )
        if not getattr(comp.factory, "is_target", True):
            raise ConfigError(
                f"evaluation.targets[{i}]: {t.name!r} is a function only, not a target"
            )
    return targets


def require_task(cfg: RunConfig) -> None:
    """Suites retrain from the config alone: a registered ``task`` entry is required."""
    if cfg.task is None:
        raise ConfigError(
            "task: suites and benches rebuild the task in worker processes; give "
            "`task: {name: <registered task>, ...}` (see `attribution list --kind task`)"
        )


def kept_count(kept_fraction: float, n_train: int) -> int:
    """``⌊α·N⌋`` of the decimal α as written (0.57 · 100 = 57, not float's 56.99…)."""
    return math.floor(Fraction(repr(float(kept_fraction))) * n_train)


def draw_masks(n_train: int, subsets: int, kept_fraction: float, seed: int) -> np.ndarray:
    """``(subsets, n_train)`` bool, exactly ``⌊α·N⌋`` True per row, from ``seed``."""
    n_keep = kept_count(kept_fraction, n_train)
    if not 0 < n_keep < n_train:
        raise ConfigError(
            f"evaluation.lds.kept_fraction: {kept_fraction} keeps {n_keep} of {n_train} examples; "
            f"choose α in (0, 1) with 0 < ⌊αN⌋ < N"
        )
    rng = np.random.default_rng([seed, 7])
    masks = np.zeros((subsets, n_train), dtype=bool)
    for m in range(subsets):
        masks[m, rng.permutation(n_train)[:n_keep]] = True
    return masks


def build_suite(
    config: str | Path | dict[str, Any] | RunConfig,
    out: str | Path,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = False,
    command: str | None = None,
) -> Suite:
    """Build (or resume) a suite at ``out``; see the module docstring for the layout.

    Raises:
        ConfigError: bad targets or LDS settings, or ``out`` holds a suite of another config.
    """
    cfg = load_config(config, overrides)
    require_task(cfg)
    with directory_lock(out, what="suite"):
        return _build_suite(cfg, Path(out), progress, command)


def _identity(cfg: RunConfig, lds: LDSConfig, tids: list[str]) -> dict[str, Any]:
    """What defines a suite's runs: a resumed build with another identity is refused."""
    return {
        "task": cfg.task.model_dump(),
        "targets": tids,
        "lds": {k: getattr(lds, k) for k in ("kept_fraction", "removed_weight")},
        "seed": cfg.seed,
        "model": cfg.model.model_dump(),
        "queries": cfg.queries.model_dump(),
        "dtype": cfg.dtype,
        **(single.identity(lds) if lds.protocol == single.SINGLE else {}),
    }


def _build_suite(cfg: RunConfig, out: Path, progress: bool, command: str | None) -> Suite:
    resolved = resolve(cfg)
    lds = cfg.evaluation.lds or LDSConfig()
    is_single = lds.protocol == single.SINGLE
    targets = check_targets(cfg, resolved.registry)
    executor = make_executor(cfg, resolved.registry)
    tids = [target_id(t) for t in targets]
    out = Path(out)
    identity = _identity(cfg, lds, tids)
    meta_path = out / "suite.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        was = old.get("identity", {})
        differing = [
            k for k in identity if k != "task" and was.get(k) != as_json(identity[k])
        ]  # the task is compared by its description (a changed default keeps old suites valid)
        if differing or was.keys() != identity.keys():
            raise ConfigError(
                f"--out {str(out)!r} holds a suite built from another config; choose a new --out "
                f"(or delete it) — differing: "
                + ", ".join(differing or sorted(was.keys() ^ identity.keys()))
            )
    torch.set_num_threads(cfg.threads)
    task = build_task(resolved)
    if meta_path.is_file():
        check_task(old, out, task)
    if is_single:  # the hook, the base model's path, the draws: before any work
        single.check_single_model(cfg, task, resolved.registry, targets)
    n = task.n_train
    masks = draw_masks(n, lds.subsets, lds.kept_fraction, cfg.seed)
    meta: dict[str, Any] = {
        "status": "building",
        "identity": identity,
        "command": command or " ".join(shlex.quote(a) for a in ["attribution", *sys.argv[1:]]),
        "config": cfg.model_dump(mode="json"),
        "task": task.describe(),
        "n_train": n,
        "protocol": lds.protocol,
        "lds": {k: getattr(lds, k) for k in LDS_KEYS},
        "targets": {tid: t.model_dump() for tid, t in zip(tids, targets, strict=True)},
        "seeds": {
            "masks": cfg.seed,
            "noise": cfg.seed,
            "base_model": cfg.model.seed,
            "queries": cfg.queries.seed,
            "truth": [TRUTH_SEED + k for k in range(lds.seeds)],
            "full": [TRUTH_SEED + k for k in range(lds.seeds)],
            "oracle": f"{ORACLE_SEED} + subset index",
        },
        "threads": cfg.threads,
        "versions": versions(resolved.registry),
    }
    if is_single:
        meta.update(single.meta_of(cfg, lds), seeds=single.seeds_of(cfg, lds))
    atomic_write_json(meta_path, meta)
    atomic_save_npy(out / "masks.npy", masks)

    base = out / "base" / "model.safetensors"
    qpath = out / "queries"
    if not (base.is_file() and (qpath / "keys.json").is_file()):  # else resumed: both final
        model = (
            single.train_base(task, cfg.model.seed) if is_single else load_or_train_model(task, cfg)
        )
        queries = load_queries(task, model, cfg)
        save_query_batch(qpath, queries)
        save_tensors(base, model.state_dict(), {"seed": str(cfg.model.seed)})
    n_query = int(next(iter(load_query_arrays(qpath).values())).shape[0])
    if is_single:
        built = (task, resolved.registry, targets, tids)
        meta["reliability"] = single.build_arrays(cfg, out, built, masks, executor, progress)
    else:
        distributional_arrays(cfg, out, masks, targets, tids, n_query, executor, progress)
        meta["reliability"] = {
            tid: reliability(np.load(out / "truth" / f"{tid}.npy")) for tid in tids
        }
    meta["mc_stderr_mean"] = {
        tid: float(np.load(out / "truth" / f"{tid}.stderr.npy").mean()) for tid in tids
    }
    meta["n_query"] = n_query
    meta["files"] = hash_suite(out)
    meta["status"] = "complete"
    atomic_write_json(meta_path, meta)
    return load_suite(out)
