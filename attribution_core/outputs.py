"""Where a method's scores go: the sink factory the pipeline hands each scorer, and reuse.

With an output directory, ``scores.npy`` is written in place through a
:class:`~attribution_core.sinks.MemmapSink`; with ``topk: K`` only ``topk.npz`` is written
(:class:`~attribution_core.sinks.TopKSink`); without either, the scores stay in memory
(:class:`~attribution_core.records.MemorySink`). A scorer that returns its own tensor instead
of its sink's result still works: that tensor is written as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attribution_core.errors import ConfigError
from attribution_core.integrity import check_files, file_record
from attribution_core.records import MemorySink, ScoreSink
from attribution_core.sinks import MemmapSink, TopK, TopKSink
from attribution_core.storage import atomic_save_npy

Scores = np.ndarray | TopK
"""A method's output: ``(n_train, n_query)`` scores (possibly a read-only memmap) or a TopK."""


def output_name(topk: int | None) -> str:
    """``topk.npz`` for a top-k run, else ``scores.npy``."""
    return "topk.npz" if topk is not None else "scores.npy"


def check_topk(topk: int | None, n_train: int) -> None:
    """``topk`` must not exceed the number of training examples (checked before any work)."""
    if topk is not None and topk > n_train:
        raise ConfigError(
            f"topk: {topk} is larger than the task's {n_train} training examples; give "
            f"--topk ≤ {n_train} (or leave it out for the full scores.npy)"
        )


def require_full_scores(topk: int | None, command: str) -> None:
    """``bench``/``counterfactual`` need every score: refuse a top-k run before any work."""
    if topk is not None:
        raise ConfigError(
            f"topk: {topk} keeps only the top {topk} examples per query, but `{command}` needs "
            f"the full scores; remove `topk` (or --set topk=null) for this command"
        )


class MethodOutput:
    """The ``ScoringContext.sink`` factory of one method, and its output once scored.

    Args:
        directory: ``OUT/<label>`` (None: nothing written).
        topk: keep only the ``topk`` most positive/negative examples per query (None: all).
        dtype: the run's dtype (``"float32"`` or ``"float64"``): in-memory scores keep it.
    """

    def __init__(self, directory: Path | None, topk: int | None, dtype: str) -> None:
        self.directory, self.topk, self.dtype = directory, topk, dtype
        self.opened: list[ScoreSink] = []

    def path(self) -> Path | None:
        """Where the output file goes."""
        return self.directory / output_name(self.topk) if self.directory is not None else None

    def __call__(
        self, n_train: int, n_query: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> ScoreSink:
        """Open a sink (``SinkFactory``)."""
        if self.topk is not None:
            sink: ScoreSink = TopKSink(self.path(), n_train, n_query, self.topk)
        elif self.directory is None:
            sink = MemorySink(n_train, n_query, dtype, device)
        else:
            keep = self.dtype == "float64" and dtype == torch.float64
            sink = MemmapSink(self.path(), n_train, n_query, dtype, device, keep_in_memory=keep)
        self.opened.append(sink)
        return sink

    def __enter__(self) -> MethodOutput:
        return self

    def __exit__(
        self, kind: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.discard()

    def discard(self) -> None:
        """Remove what every opened sink left (temporary files)."""
        for sink in self.opened:
            if isinstance(sink, MemmapSink | TopKSink):
                sink.discard()
        self.opened.clear()

    def finish(self, scores: Tensor | TopK) -> tuple[Scores, dict[str, Any]]:
        """Commit the scorer's output: ``(scores, {file name: size+sha256})`` (no file: ``{}``)."""
        used = next((s for s in self.opened if s.result() is scores), None)
        self.opened = [s for s in self.opened if s is not used]
        self.discard()  # sinks a scorer opened but did not return (e.g. a composite's members)
        if isinstance(used, MemmapSink | TopKSink):
            out = used.commit()
        elif self.topk is not None:
            sink = TopKSink(self.path(), *scores.shape, self.topk)
            sink.write(slice(0, scores.shape[0]), scores)
            out = sink.commit()
        else:
            out = scores.detach().cpu().numpy()
            if self.path() is not None:
                atomic_save_npy(self.path(), out.astype(np.float32))
        if isinstance(out, np.ndarray) and self.dtype == "float32" and out.dtype != np.float32:
            out = out.astype(np.float32)
        path = self.path()
        return out, ({path.name: file_record(path)} if path is not None else {})


def finished(
    directory: Path, identity: dict[str, Any], topk: int | None
) -> tuple[Scores, dict[str, Any]] | None:
    """A finished output of ``directory`` with this identity: ``(scores, manifest)``, or None.

    Full scores come back as a read-only memmap of ``scores.npy``.
    """
    scores, manifest = directory / output_name(topk), directory / "manifest.json"
    if not (scores.is_file() and manifest.is_file()):
        return None
    try:
        saved = json.loads(manifest.read_text())
        if saved.get("identity") != json.loads(json.dumps(identity, default=str)):
            return None
        if check_files(directory, saved.get("files", {}), what="its manifest"):
            return None  # truncated or edited since: recomputed, never taken as finished
        return (TopK.load(scores) if topk is not None else np.load(scores, mmap_mode="r")), saved
    except (ValueError, OSError):
        return None
