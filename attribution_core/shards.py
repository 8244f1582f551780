"""Shards: row ranges of the training set — the unit of distribution, resume and reduction.

A method's data passes (training gradients + scores, a projected Fisher, K-FAC factor statistics)
are split into ``shards`` row ranges of the training set, defined by the data alone: boundaries
are multiples of ``align`` (the run's ``chunk_size``) and do not depend on the executor. Every
Monte-Carlo draw of a pass is seeded per example, so a shard computes the same rows wherever it
runs; :class:`ShardRunner` sends one job per shard to the run's executor (``local``: in this
process, in order; ``ray``: one Ray task each) and

* :meth:`ShardRunner.reduce` sums the shards' partial results **in shard order** (a left fold,
  buffering shards that finish early), so the local and the Ray executor give the same bits for
  the same ``shards`` and ``threads``; one shard against ``S`` shards differs by float round-off
  only (the sum's association changes);
* :meth:`ShardRunner.map` yields each shard's result (e.g. its rows of ``scores``) as it finishes.

With a store (``OUT/<label>/.shards/``, written when the run has an output directory), each
finished shard is saved atomically; a re-run of the same method (same identity) loads the
finished shards and computes only the missing ones — the resume unit after a killed driver.
:attr:`ShardRunner.counts` records, per phase, how many shards were computed, reused, and how
many ran as executor tasks (the manifest's ``shards`` entry).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attribution_core.interfaces import Executor
from attribution_core.storage import atomic_write, atomic_write_json

ShardJob = Callable[[slice], Any]
"""``job(rows) -> result`` for rows ``rows`` of the training set (picklable for Ray)."""


def shard_ranges(n_rows: int, count: int, align: int = 1) -> tuple[slice, ...]:
    """``count`` contiguous row ranges covering ``0..n_rows``, boundaries multiples of ``align``.

    The ``ceil(n_rows / align)`` aligned blocks are split as evenly as possible; fewer blocks
    than ``count`` give fewer (non-empty) shards.
    """
    if n_rows < 0 or count < 1 or align < 1:
        raise ValueError(f"shard_ranges: n_rows={n_rows}, count={count}, align={align}")
    blocks = -(-n_rows // align)
    count = max(1, min(count, blocks))
    bounds = [min(n_rows, (blocks * i // count) * align) for i in range(count + 1)]
    return tuple(slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a)


@dataclass(frozen=True)
class _Call:
    """What the executor runs for one shard: pin torch's threads, then ``job(rows)``."""

    job: ShardJob
    threads: int

    def __call__(self, rows: slice) -> Any:
        torch.set_num_threads(self.threads)
        return self.job(rows)


class ShardStore:
    """Finished shard results of one method on disk: ``DIR/<phase>/<i>-<start>-<stop>.pt``.

    ``DIR/identity.json`` holds the identity the results belong to; a store opened with another
    identity is emptied first, so a result is never reused for other inputs.
    """

    def __init__(self, directory: str | Path, identity: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        text = json.dumps(identity, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()
        marker = self.directory / "identity.json"
        if marker.is_file():
            try:
                same = json.loads(marker.read_text()).get("sha256") == digest
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.directory, ignore_errors=True)
        if not marker.is_file():
            atomic_write_json(marker, {"sha256": digest, "identity": json.loads(text)})

    def _path(self, phase: str, index: int, rows: slice) -> Path:
        return self.directory / phase / f"{index:05d}-{rows.start}-{rows.stop}.pt"

    def load(self, phase: str, index: int, rows: slice) -> Any | None:
        """The saved result of shard ``index`` of ``phase``, or None."""
        path = self._path(phase, index, rows)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            path.unlink(missing_ok=True)
            return None

    def save(self, phase: str, index: int, rows: slice, result: Any) -> None:
        """Save a finished shard (atomic: a killed run leaves it whole or absent)."""
        atomic_write(self._path(phase, index, rows), lambda fh: torch.save(result, fh))

    def clear(self) -> None:
        """Remove the store (the method finished)."""
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class ShardRunner:
    """Runs one method's shard jobs on the run's executor, with resume and counts.

    Attributes:
        executor: the run's executor.
        count: shards requested (``shards`` in the config).
        align: shard boundaries are multiples of this (the run's ``chunk_size``).
        threads: torch threads each job pins (the run's ``threads``).
        store: finished shards on disk (None: nothing saved, nothing resumed).
        progress: progress bars.
        counts: phase -> ``{shards, computed, reused, remote_tasks, executor}`` (manifest):
            jobs in the phase, computed now, loaded from the store, run as executor tasks
            outside this process (Ray).
    """

    executor: Executor
    count: int = 1
    align: int = 1
    threads: int = 1
    store: ShardStore | None = None
    progress: bool = False
    counts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        """True when jobs leave this process (any executor but ``local``)."""
        return self.executor.name != "local"

    def ranges(self, n_rows: int) -> tuple[slice, ...]:
        """The shards of ``n_rows`` training rows."""
        return shard_ranges(n_rows, self.count, self.align)

    def map(
        self, phase: str, job: ShardJob, n_rows: int, *, max_rows: int | None = None
    ) -> Iterator[tuple[int, slice, Any]]:
        """Yield ``(shard index, rows, job(rows))`` for every shard (stored ones first).

        ``max_rows`` splits shards further into jobs of at most that many rows (aligned), for
        results whose size grows with the rows (score blocks); a reduction never splits.
        """
        ranges = self.ranges(n_rows)
        if max_rows is not None:
            step = max(self.align, max_rows // self.align * self.align)
            ranges = tuple(
                slice(a, min(a + step, r.stop))
                for r in ranges
                for a in range(r.start, r.stop, step)
            )
        tally = self.counts.setdefault(
            phase,
            {"shards": len(ranges), "computed": 0, "reused": 0, "remote_tasks": 0,
             "executor": self.executor.name},
        )  # fmt: skip
        missing = []
        for i, rows in enumerate(ranges):
            done = self.store.load(phase, i, rows) if self.store is not None else None
            if done is None:
                missing.append(i)
                continue
            tally["reused"] += 1
            yield i, rows, done
        items = [ranges[i] for i in missing]
        results = self.executor.map(
            _Call(job, self.threads), items, desc=f"{phase} shards", progress=self.progress
        )
        for k, result in results:
            i = missing[k]
            tally["computed"] += 1
            tally["remote_tasks"] += int(self.distributed)
            if self.store is not None:
                self.store.save(phase, i, ranges[i], result)
            yield i, ranges[i], result

    def reduce(self, phase: str, job: ShardJob, n_rows: int) -> Any:
        """``Σ_shards job(rows)`` summed in shard order (tensors, or dicts/lists of them)."""
        pending: dict[int, Any] = {}
        total: Any = None
        nxt = 0
        for i, _, result in self.map(phase, job, n_rows):
            pending[i] = result
            while nxt in pending:
                part = pending.pop(nxt)
                total = part if total is None else tree_add(total, part)
                nxt += 1
        return total


def tree_add(a: Any, b: Any) -> Any:
    """``a + b`` for tensors, numbers, and dicts / lists / tuples of them (same structure)."""
    if isinstance(a, Mapping):
        if set(a) != set(b):
            raise ValueError(f"shard results differ in keys: {sorted(a)} vs {sorted(b)}")
        return {k: tree_add(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(tree_add(x, y) for x, y in zip(a, b, strict=True))
    return a + b
