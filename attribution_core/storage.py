"""Atomic writes: a file is either absent or complete, never half-written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save


def _atomic(path: Path, write: Any, suffix: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    _atomic(Path(path), lambda fh: np.save(fh, np.asarray(array)), ".tmp.npy")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically."""
    _atomic(Path(path), lambda fh: fh.write(text.encode()), ".tmp")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_tensors(
    path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """Save torch tensors as safetensors atomically (no pickles)."""
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    _atomic(Path(path), lambda fh: fh.write(data), ".tmp.safetensors")
