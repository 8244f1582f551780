"""``attribution topk``: the top positive and negative training examples of a query."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from attribution_core.errors import DataError
from attribution_core.sinks import TopK


def method_dirs(out: str | Path) -> list[Path]:
    """Sub-directories of a bench/attribute output that hold ``scores.npy`` or ``topk.npz``."""
    root = Path(out)
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a directory; give a bench/attribute --out directory")
    dirs = sorted(
        p for p in root.iterdir() if any((p / f).is_file() for f in ("scores.npy", "topk.npz"))
    )
    if not dirs:
        raise DataError(
            f"{str(root)!r} holds no <label>/scores.npy or topk.npz; run `attribution bench` or "
            f"`attribute` first"
        )
    return dirs


def _check_query(query: int, n_query: int, label: str) -> None:
    if not 0 <= query < n_query:
        raise DataError(
            f"--query {query}: out of range; {label} has {n_query} queries (0..{n_query - 1})"
        )


def _entries(index: np.ndarray, score: np.ndarray) -> list[dict[str, Any]]:
    return [{"index": int(i), "score": float(s)} for i, s in zip(index, score, strict=True)]


def _from_topk(d: Path, query: int, k: int) -> dict[str, Any]:
    top = TopK.load(d / "topk.npz")
    _check_query(query, top.shape[1], d.name)
    if k > top.k:
        raise DataError(
            f"--k {k}: {d.name}/topk.npz holds only the top {top.k} per query; give --k ≤ "
            f"{top.k} or re-run `attribute` with a larger --topk (or without it)"
        )
    pos = _entries(top.positive_index[query, :k], top.positive_score[query, :k].astype(np.float64))
    neg = _entries(top.negative_index[query, :k], top.negative_score[query, :k].astype(np.float64))
    return {"positive": pos, "negative": neg}


def _from_scores(d: Path, query: int, k: int) -> dict[str, Any]:
    scores = np.load(d / "scores.npy", mmap_mode="r")
    _check_query(query, scores.shape[1], d.name)
    col = np.asarray(scores[:, query], dtype=np.float64)
    pos, neg = np.argsort(-col, kind="stable")[:k], np.argsort(col, kind="stable")[:k]
    return {"positive": _entries(pos, col[pos]), "negative": _entries(neg, col[neg])}


def topk(out: str | Path, query: int, k: int = 8) -> dict[str, Any]:
    """``{label: {"positive": [(index, score)...], "negative": [...]}}`` for query ``query``.

    Positive = removing the example raises the target on the query most (it helped the most).
    Reads ``scores.npy`` (memory-mapped, one column read) or a ``topk.npz`` (``k`` ≤ its K).
    Ties: the smaller training index first, in both lists.
    """
    if k < 1:
        raise DataError(f"--k {k}: must be ≥ 1")
    return {
        d.name: _from_scores(d, query, k)
        if (d / "scores.npy").is_file()
        else _from_topk(d, query, k)
        for d in method_dirs(out)
    }


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
