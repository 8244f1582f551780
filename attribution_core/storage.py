"""Atomic writes: a file is either absent or complete, never half-written.

Every result file goes through :func:`atomic_write`: a temporary file in the same folder,
``fsync``, then ``os.replace`` over the final name. A write that fails — a full disk
(``ENOSPC``/``EDQUOT``) included — removes its temporary file and leaves the previous file (or
none) in place, so a re-run after space is freed resumes from the finished files only. A full
disk raises :class:`DiskFullError` naming the path (CLI exit 1, no traceback).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from safetensors.torch import save

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write failed because the filesystem is full; ``filename`` is the path being written."""


def disk_full(exc: BaseException) -> bool:
    """True for an ``OSError`` that means "no space left" (or a full quota)."""
    return isinstance(exc, OSError) and exc.errno in FULL_DISK


def full_disk_message(exc: OSError, path: str | Path | None = None) -> str:
    """``"no space left on the device writing '<path>': free space and re-run to resume"``."""
    where = path if path is not None else (exc.filename or "an output file")
    return (
        f"no space left on the device writing {str(where)!r} ({os.strerror(exc.errno or 0)}); "
        f"nothing partial was kept — free space (or choose another --out/cache_dir) and re-run "
        f"the same command to resume"
    )


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], suffix: str = ".tmp") -> Path:
    """Call ``write(fh)`` on a temporary file next to ``path``, fsync, rename over ``path``.

    Raises:
        DiskFullError: the filesystem is full (the temporary file is removed).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as exc:
        if disk_full(exc):
            raise DiskFullError(exc.errno, full_disk_message(exc, path), str(path)) from None
        raise
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(exc):
            raise DiskFullError(exc.errno, full_disk_message(exc, path), str(path)) from None
        raise
    return path


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    atomic_write(Path(path), lambda fh: np.save(fh, np.asarray(array)), ".tmp.npy")


def atomic_savez(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` of named arrays, atomically."""
    atomic_write(Path(path), lambda fh: np.savez(fh, **arrays), ".tmp.npz")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically."""
    atomic_write(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_to_csv(path: str | Path, table: Any) -> None:
    """``DataFrame.to_csv(path, index=False)``, atomically."""
    atomic_write_text(path, table.to_csv(index=False))


def atomic_savefig(path: str | Path, fig: Any, **kwargs: Any) -> None:
    """``fig.savefig`` atomically (the format is taken from ``path``'s suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(Path(path), lambda fh: fig.savefig(fh, format=fmt, **kwargs), f".tmp.{fmt}")


def save_tensors(
    path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """Save torch tensors as safetensors atomically (no pickles)."""
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(Path(path), lambda fh: fh.write(data), ".tmp.safetensors")
