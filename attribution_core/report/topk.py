"""``attribution topk``: the top positive and negative training examples of a query."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from attribution_core.errors import DataError


def method_dirs(out: str | Path) -> list[Path]:
    """Sub-directories of a bench/attribute output that hold ``scores.npy``."""
    root = Path(out)
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a directory; give a bench/attribute --out directory")
    dirs = sorted(p for p in root.iterdir() if (p / "scores.npy").is_file())
    if not dirs:
        raise DataError(
            f"{str(root)!r} holds no <label>/scores.npy; run `attribution bench` or `attribute` first"
        )
    return dirs


def topk(out: str | Path, query: int, k: int = 8) -> dict[str, Any]:
    """``{label: {"positive": [(index, score)...], "negative": [...]}}`` for query ``query``.

    Positive = removing the example raises the target on the query most (it helped the most).
    """
    if k < 1:
        raise DataError(f"--k {k}: must be ≥ 1")
    result: dict[str, Any] = {}
    for d in method_dirs(out):
        scores = np.load(d / "scores.npy")
        if not 0 <= query < scores.shape[1]:
            raise DataError(
                f"--query {query}: out of range; {d.name} has {scores.shape[1]} queries (0..{scores.shape[1] - 1})"
            )
        col = scores[:, query].astype(np.float64)
        order = np.argsort(-col, kind="stable")
        result[d.name] = {
            "positive": [{"index": int(i), "score": float(col[i])} for i in order[:k]],
            "negative": [{"index": int(i), "score": float(col[i])} for i in order[::-1][:k]],
        }
    return result


def format_topk(result: dict[str, Any], query: int, fmt: str = "table") -> str:
    """Text table or JSON."""
    if fmt == "json":
        return json.dumps({"query": query, "methods": result}, indent=2)
    lines = []
    for label, r in result.items():
        lines.append(f"{label} (query {query})")
        for sign in ("positive", "negative"):
            items = ", ".join(f"#{e['index']} ({e['score']:+.4g})" for e in r[sign])
            lines.append(f"  {sign}: {items}")
    return "\n".join(lines)
