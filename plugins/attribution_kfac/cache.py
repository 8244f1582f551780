"""Fitted factors on disk: ``<cache_dir>/kfac/<key>.safetensors`` with a checksum.

The file's metadata holds the JSON key parts and a SHA-256 over every tensor (name, dtype,
shape, bytes). A file that cannot be read, whose parts differ, or whose checksum fails is
reported with a warning and recomputed (then overwritten atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attribution_core import cache_key, save_tensors


def _checksum(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FactorCache:
    """Load/save factor dicts keyed by JSON-able ``parts``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root) / "kfac"

    def path(self, parts: dict[str, Any]) -> Path:
        """``<root>/kfac/<hash of parts>.safetensors``."""
        return self.root / f"{cache_key(**parts)}.safetensors"

    def load(self, parts: dict[str, Any], device: torch.device) -> dict[str, Tensor] | None:
        """The cached tensors (on ``device``), or None if absent; corrupted → warning, None."""
        from safetensors import safe_open

        path = self.path(parts)
        if not path.is_file():
            return None
        expected = json.dumps(parts, sort_keys=True, default=str)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            if meta.get("parts") != expected:
                raise ValueError("its recorded key parts differ")
            if meta.get("checksum") != _checksum(tensors):
                raise ValueError("checksum mismatch")
        except Exception as exc:  # any unreadable/corrupted file is recomputed
            warnings.warn(
                f"kfac factor cache {str(path)!r} is corrupted ({type(exc).__name__}: {exc}); "
                f"recomputing the factors and overwriting it",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        return {k: v.to(device) for k, v in tensors.items()}

    def save(self, parts: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
        """Write atomically (temporary file, fsync, then rename; a full disk leaves nothing)."""
        path = self.path(parts)
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"parts": json.dumps(parts, sort_keys=True, default=str), "checksum": _checksum(cpu)}
        save_tensors(path, cpu, meta)
        return path
