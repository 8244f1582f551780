"""Metagradient scores on disk, keyed by base model, queries, measurement and draws.

A metagradient pass costs several training runs, and its scores depend only on the attributed
(base) model, the task's recipe, the queries, the query measurement with its draws and the
pass's layout — not on the suite it is benchmarked against. So ``bench`` on two suites that share
a base model (``digits2-ddpm-single`` at α = 0.99 and ``-a50`` at α = 0.5) computes them once:
``<cache_dir>/metagradient/<key>.safetensors`` holds the ``(N, Q)`` scores and the key's parts
as metadata; the file is written atomically (:func:`attribution_core.save_tensors`) and checked
against the key's parts when read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from attribution_core import (
    Batch,
    Measurement,
    Task,
    cache_key,
    data_fingerprint,
    model_fingerprint,
    save_tensors,
)

FORMAT = 1


def score_key_parts(
    task: Task,
    model: nn.Module,
    queries: Batch,
    measurement: Measurement,
    noise: dict[str, Any],
    layout: dict[str, Any],
) -> dict[str, Any]:
    """What the scores depend on (JSON-able): change any part and the key changes.

    Args:
        noise: how the query draws were made (seed, stream).
        layout: the pass's options that may change the last bits (query_batch) — checkpoint
            spacing is excluded: every ``k`` gives the same bits.
    """
    return {
        "format": FORMAT,
        "task": task.describe(),
        "model": model_fingerprint(model),
        "queries": data_fingerprint(queries),
        "measurement": measurement.describe(),
        "noise": noise,
        "layout": layout,
        "dtype": str(task.dtype),
    }


class ScoreCache:
    """``(N, Q)`` metagradient scores under ``root/metagradient/`` (None root: no cache)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = None if root is None else Path(root) / "metagradient"

    def path(self, parts: dict[str, Any]) -> Path | None:
        """The entry's file for ``parts`` (None without a cache)."""
        return None if self.root is None else self.root / f"{cache_key(**parts)}.safetensors"

    def load(self, parts: dict[str, Any]) -> Tensor | None:
        """The stored scores, or None when absent or stored under other parts."""
        path = self.path(parts)
        if path is None or not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("parts") != json.dumps(parts, sort_keys=True, default=str):
            return None
        return load_file(str(path))["scores"]

    def save(self, parts: dict[str, Any], scores: Tensor) -> Path | None:
        """Store ``scores`` atomically; returns the file (None without a cache)."""
        path = self.path(parts)
        if path is None:
            return None
        meta = {"parts": json.dumps(parts, sort_keys=True, default=str)}
        save_tensors(path, {"scores": scores.detach().cpu().contiguous()}, meta)
        return path
