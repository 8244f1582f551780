"""Score sinks that never hold the ``(n_train, n_query)`` matrix whole in memory.

* :class:`MemmapSink` writes row blocks straight into ``OUT/<label>/scores.npy`` (a
  memory-mapped ``.npy``, float32 on disk like every ``scores.npy``), allocated up front with
  ``posix_fallocate`` so a full disk fails at allocation (:class:`DiskFullError`), not with a
  ``SIGBUS`` on a later page write. It becomes ``scores.npy`` (fsync, rename) only once every
  row was written.
* :class:`TopKSink` keeps, per query, the ``K`` most positive and ``K`` most negative scores and
  their training indices while the blocks stream in (memory ``O(K·Q)``), and writes
  ``OUT/<label>/topk.npz`` atomically.

Ties (top-k): within equal scores the smaller training index comes first, in both the positive
(descending score) and the negative (ascending score) lists — the order of a stable sort.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor

from attribution_core.errors import DataError
from attribution_core.records import MemorySink, ScoreSink
from attribution_core.storage import DiskFullError, atomic_savez, disk_full, full_disk_message

TOPK_ARRAYS = ("positive_index", "positive_score", "negative_index", "negative_score")
_COUNTER = itertools.count()


class _Rows:
    """How many query columns of each training row were written (never the scores)."""

    def __init__(self, n_train: int, n_query: int) -> None:
        self.n_train, self.n_query = n_train, n_query
        self.filled = np.zeros(n_train, dtype=np.int64)

    def mark(self, rows: slice, block: Tensor, cols: slice | None = None) -> np.ndarray:
        """Check ``block``'s shape against ``rows``/``cols``; the block as float32 numpy."""
        start, stop, _ = rows.indices(self.n_train)
        c0, c1, _ = (cols or slice(None)).indices(self.n_query)
        if tuple(block.shape) != (stop - start, c1 - c0):
            raise ValueError(
                f"sink block mismatch: expected shape {(stop - start, c1 - c0)} for rows "
                f"{start}:{stop}, columns {c0}:{c1}, got {tuple(block.shape)}"
            )
        self.filled[start:stop] += c1 - c0
        return block.detach().cpu().numpy().astype(np.float32, copy=False)

    def check_complete(self, what: str) -> None:
        """Raise unless every row was written in every query column."""
        missing = int((self.filled < self.n_query).sum())
        if missing:
            raise RuntimeError(f"{what}: {missing} of {self.n_train} training rows never written")


def _tmp_path(final: Path) -> Path:
    return final.parent / f".{final.stem}.{os.getpid()}.{next(_COUNTER)}.tmp{final.suffix}"


def _allocate(path: Path, final: Path, n_train: int, n_query: int) -> np.memmap:
    """``open_memmap(path)`` of float32 ``(n_train, n_query)``, its bytes allocated up front."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mm = open_memmap(path, mode="w+", dtype=np.float32, shape=(n_train, n_query))
        size = path.stat().st_size
        fd = os.open(path, os.O_RDWR)
        try:
            if size:
                os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        return mm
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if disk_full(exc):
            raise DiskFullError(exc.errno, full_disk_message(exc, final), str(final)) from None
        raise


class MemmapSink(ScoreSink):
    """Scores written in place into ``path`` (``scores.npy``), float32 on disk.

    The file is first ``<dir>/.scores.<pid>.<n>.tmp.npy``; :meth:`commit` flushes, fsyncs and
    renames it to ``path`` once every row was written; :meth:`discard` removes it.

    :meth:`result` is a float32 tensor over the writable map, so the matrix is never copied
    into memory. With ``keep_in_memory`` the ``dtype`` matrix is also kept in memory and is
    the result (a float64 run's scores stay float64 in memory, as before); the file gets
    float32 rows either way.
    """

    def __init__(
        self,
        path: str | Path,
        n_train: int,
        n_query: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        keep_in_memory: bool = False,
    ) -> None:
        self.path = Path(path)
        self.rows = _Rows(n_train, n_query)
        self.tmp = _tmp_path(self.path)
        self.map = _allocate(self.tmp, self.path, n_train, n_query)
        self.memory = MemorySink(n_train, n_query, dtype, device) if keep_in_memory else None
        self._result = self.memory.result() if self.memory else torch.from_numpy(self.map)

    def write(self, rows: slice, block: Tensor, cols: slice | None = None) -> None:
        """Write the block into the map's ``rows`` (and query columns ``cols``), float32."""
        self.map[rows, cols if cols is not None else slice(None)] = self.rows.mark(
            rows, block, cols
        )
        if self.memory is not None:
            self.memory.write(rows, block, cols)

    def result(self) -> Tensor:
        """The scores (the same tensor every call): the map, or the float64 matrix."""
        return self._result

    def commit(self) -> np.ndarray:
        """Flush, fsync, rename to ``path``; the scores (read-only map, or float64 array)."""
        try:
            self.rows.check_complete(f"scores {str(self.path)!r}")
            self.map.flush()
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp, self.path)
        except BaseException as exc:
            self.discard()
            if disk_full(exc):
                message = full_disk_message(exc, self.path)
                raise DiskFullError(exc.errno, message, str(self.path)) from None
            raise
        if self.memory is not None:
            return self.memory.result().detach().cpu().numpy()
        return np.load(self.path, mmap_mode="r")

    def discard(self) -> None:
        """Remove the temporary file (nothing is kept)."""
        self.tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class TopK:
    """Per query, the ``k`` most positive and most negative training examples.

    Attributes:
        positive_index, positive_score: ``(n_query, k)``, scores descending.
        negative_index, negative_score: ``(n_query, k)``, scores ascending.
        n_train: number of training examples scored.
    """

    positive_index: np.ndarray
    positive_score: np.ndarray
    negative_index: np.ndarray
    negative_score: np.ndarray
    n_train: int

    @property
    def k(self) -> int:
        """Examples kept per sign."""
        return int(self.positive_index.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_train, n_query)`` of the full matrix these were taken from."""
        return (self.n_train, int(self.positive_index.shape[0]))

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays of ``topk.npz``."""
        return {**{a: getattr(self, a) for a in TOPK_ARRAYS}, "n_train": np.asarray(self.n_train)}

    @classmethod
    def load(cls, path: str | Path) -> TopK:
        """Read a ``topk.npz``."""
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in (*TOPK_ARRAYS, "n_train") if a not in z.files]
            if missing:
                raise DataError(f"{str(path)!r}: not a topk.npz (missing {', '.join(missing)})")
            return cls(*(z[a] for a in TOPK_ARRAYS), n_train=int(z["n_train"]))


def _best(values: np.ndarray, index: np.ndarray, k: int, sign: int) -> tuple:
    """The ``k`` rows (per column) with the largest ``sign · value``, ties by smaller index."""
    order = np.lexsort((index, -sign * values), axis=0)[:k]
    return np.take_along_axis(values, order, 0), np.take_along_axis(index, order, 0)


class TopKSink(ScoreSink):
    """Keeps the ``k`` most positive and negative scores per query (memory ``O(k·n_query)``).

    Scores are ranked as float32 (the values ``scores.npy`` would hold), so ``topk.npz`` agrees
    with ``attribution topk`` on the full scores of the same run. :meth:`result` returns a
    :class:`TopK`, not a tensor: a scorer must return it unchanged.
    """

    def __init__(self, path: str | Path | None, n_train: int, n_query: int, k: int) -> None:
        if not 1 <= k <= n_train:
            raise DataError(f"topk {k}: must be between 1 and n_train = {n_train}")
        self.path = Path(path) if path is not None else None
        self.k = k
        self.rows = _Rows(n_train, n_query)
        # k placeholders per sign and query (value ∓inf, index n_train) that any written row
        # beats; all are replaced once every row is in (k ≤ n_train)
        self.best = {
            sign: (
                np.full((k, n_query), -sign * np.inf, np.float32),
                np.full((k, n_query), n_train, np.int64),
            )
            for sign in (1, -1)
        }
        self._result: TopK | None = None

    def write(self, rows: slice, block: Tensor, cols: slice | None = None) -> None:
        """Merge the block's rows into the kept top and bottom ``k`` of columns ``cols``."""
        values = self.rows.mark(rows, block, cols)
        cols = cols if cols is not None else slice(None)
        self._result = None
        start = rows.indices(self.rows.n_train)[0]
        index = np.broadcast_to(
            np.arange(start, start + values.shape[0], dtype=np.int64)[:, None], values.shape
        )
        for sign, (v, i) in self.best.items():
            kept_v, kept_i = _best(
                np.concatenate([v[:, cols], values]),
                np.concatenate([i[:, cols], index]),
                self.k,
                sign,
            )
            v[:, cols], i[:, cols] = kept_v, kept_i

    def result(self) -> TopK:  # type: ignore[override]
        """The kept examples (the same object every call once all rows are in)."""
        if self._result is None:
            (pv, pi), (nv, ni) = self.best[1], self.best[-1]
            n = self.rows.n_train
            self._result = TopK(pi.T.copy(), pv.T.copy(), ni.T.copy(), nv.T.copy(), n_train=n)
        return self._result

    def commit(self) -> TopK:
        """Write ``topk.npz`` atomically (if a path was given); the kept examples."""
        self.rows.check_complete("topk")
        result = self.result()
        if self.path is not None:
            atomic_savez(self.path, result.arrays())
        return result

    def discard(self) -> None:
        """Nothing to remove (nothing is written before :meth:`commit`)."""
