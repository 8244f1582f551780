"""Fingerprints and the on-disk gradient cache.

* :func:`model_fingerprint`, :func:`data_fingerprint`, :func:`cache_key` — stable hashes that
  key every cache (gradients, factors, models).
* :class:`GradientCache` — gradient matrices on disk, written atomically once complete, read
  back memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attribution_core.batches import Batch
from attribution_core.storage import (
    DiskFullError,
    atomic_save_npy,
    atomic_write_text,
    disk_full,
    full_disk_message,
)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's state (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    """Stable short hash of JSON-able ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def data_fingerprint(data: Batch) -> str:
    h = hashlib.sha256()
    for k in sorted(data):
        t = data[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


class GradientCache:
    """Gradient matrices on disk, one ``.npy`` (+ ``.json`` of its key parts) per key.

    A matrix is written atomically once complete; a missing or mismatching file is recomputed.
    Reads are memory-mapped, so scoring streams chunks without loading the whole matrix.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / "gradients" / f"{key}.npy"

    def load(self, key: str, parts: dict[str, Any]) -> np.ndarray | None:
        """The cached matrix (memory-mapped) if present and recorded with the same ``parts``."""
        path = self.path(key)
        meta = path.with_suffix(".json")
        if not (path.is_file() and meta.is_file()):
            return None
        try:
            if json.loads(meta.read_text()) != json.loads(json.dumps(parts, default=str)):
                return None
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            return None

    def has(self, parts: dict[str, Any]) -> bool:
        """True when the matrix of ``parts`` is cached (and recorded with the same parts)."""
        return self.load(cache_key(**parts), parts) is not None

    def save(self, key: str, parts: dict[str, Any], matrix: np.ndarray) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(path, matrix)
        self._write_meta(path, parts)

    @staticmethod
    def _write_meta(path: Path, parts: dict[str, Any]) -> None:
        atomic_write_text(path.with_suffix(".json"), json.dumps(parts, default=str, sort_keys=True))

    @contextmanager
    def writer(
        self, key: str, parts: dict[str, Any], shape: tuple[int, int], dtype: np.dtype
    ) -> Iterator[Callable[[np.ndarray], None]]:
        """``write(rows)`` appending C-order rows to an ``.npy`` of ``shape``, published atomically.

        The ``.npy`` header is written first, then each chunk's bytes as they come (no copy of
        the whole matrix in memory, unlike ``np.save`` of a concatenation). The file is renamed
        over the key's path, and its ``.json`` written, only when the ``with`` block ends
        without an exception and all ``shape[0]`` rows were written; otherwise (an exception,
        an abandoned generator) the temporary file is removed.
        """
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.npy")
        written = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                header = {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                    "fortran_order": False,
                    "shape": tuple(shape),
                }
                np.lib.format.write_array_header_1_0(fh, header)

                def write(block: np.ndarray) -> None:
                    nonlocal written
                    block = np.ascontiguousarray(block, dtype=dtype)
                    fh.write(memoryview(block).cast("B"))  # no bytes copy of the chunk
                    written += block.shape[0]

                yield write
                if written != shape[0]:
                    raise RuntimeError(f"gradient cache: {written} of {shape[0]} rows written")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if disk_full(exc):
                raise DiskFullError(exc.errno, full_disk_message(exc, path), str(path)) from None
            raise
        self._write_meta(path, parts)
