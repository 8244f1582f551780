"""The training pass of gradient scorers: ``scores[rows, cols] = T_rows · Q_colsᵀ``.

``T`` are the (compressed) training gradients of a :class:`GradientStream`, ``Q`` a block of
(preconditioned, compressed) query gradients. Unsharded, the pass streams chunk by chunk into
the sink (one chunk in memory); with a :class:`~attribution_core.shards.ShardRunner` each shard
(split into jobs of at most ``SCORE_BLOCK_BYTES`` of scores) is one executor job that returns
its rows of scores, written into the sink by the driver — ``Q`` travels with the job, which the
Ray executor puts in the object store once per pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from attribution_core.gradients import GradientStream
from attribution_core.records import ScoreSink, ScoringContext

if TYPE_CHECKING:
    from attribution_core.task import Task

SCORE_BLOCK_BYTES = 256 * 2**20
"""Largest block of scores one shard job returns (a shard is split into several jobs above)."""

PREPARED_BYTES = 256 * 2**20
"""Query blocks whose prepared (preconditioned, compressed) rows fit together in this many bytes
share one training pass; a block that would exceed it starts the next pass."""


def query_blocks(n_query: int, block: int | None) -> list[slice]:
    """Query column ranges of at most ``block`` queries (None: one block of all)."""
    size = n_query if block is None else max(1, block)
    return [slice(a, min(a + size, n_query)) for a in range(0, max(n_query, 1), size)]


def row_scores(T: Tensor, Q: Tensor, normalise: bool) -> Tensor:
    """``T · Qᵀ`` in ``Q``'s dtype (rows of ``T`` scaled to unit norm first if ``normalise``)."""
    if normalise:
        T = T / T.norm(dim=1, keepdim=True).clamp_min(torch.finfo(T.dtype).tiny)
    return T.to(Q.dtype) @ Q.T


@dataclass(frozen=True)
class ScoreRows:
    """Shard job: the scores of training rows ``rows`` against ``queries``, ``(len(rows), q)``.

    Attributes:
        train: the training-side gradient stream (compressed when the method compresses).
        queries: ``Q: (q, k)``, the query side of the product.
        normalise: cosine similarity (unit-norm training rows; ``Q`` is normalised already).
    """

    train: GradientStream
    queries: Tensor
    normalise: bool = False

    def __call__(self, rows: slice) -> Tensor:
        out = torch.empty(rows.stop - rows.start, self.queries.shape[0], dtype=self.queries.dtype)
        for piece, T in self.train.restrict(rows).chunks():
            out[piece.start - rows.start : piece.stop - rows.start] = row_scores(
                T, self.queries, self.normalise
            )
            del T
        return out


def score_training_pass(
    train: GradientStream,
    Q: Tensor,
    sink: ScoreSink,
    context: ScoringContext,
    *,
    cols: slice | None = None,
    normalise: bool = False,
    phase: str = "scores",
) -> None:
    """Write ``scores[:, cols]`` of every training row into ``sink`` (one training pass)."""
    write = _writer(sink, cols)
    runner = context.shards
    if runner is None or (runner.count == 1 and not runner.distributed):
        for rows, T in train.chunks(progress=context.progress, desc="train gradients + scores"):
            write(rows, row_scores(T, Q, normalise))
            del T  # one training-gradient chunk alive at a time
        return
    per_row = max(1, Q.shape[0] * Q.element_size())
    blocks = runner.map(
        phase, ScoreRows(train, Q, normalise), train.n_rows, max_rows=SCORE_BLOCK_BYTES // per_row
    )
    for _, rows, block in blocks:
        write(rows, block)


def _writer(sink: ScoreSink, cols: slice | None) -> Callable[[slice, Tensor], None]:
    """``write(rows, block)`` into ``sink`` (at columns ``cols`` when given)."""
    if cols is None:
        return sink.write
    return lambda rows, block: sink.write(rows, block, cols)


def score_queries(
    task: Task,
    query: GradientStream,
    train: GradientStream,
    prepare: Callable[[Tensor], Tensor],
    context: ScoringContext,
    *,
    normalise: bool = False,
) -> Tensor:
    """Every query's scores into ``context.sink``: query blocks → ``prepare`` → training passes.

    With ``context.query_block = B`` the raw query gradients are computed ``B`` at a time
    (``B × p`` alive) and each block is prepared (``prepare``: preconditioned and/or
    compressed, ``(B, k)``) at once; consecutive prepared blocks share one training pass while
    they fit :data:`PREPARED_BYTES` (compressed queries: usually one pass for all), else each
    pass scores its group's columns. Without ``query_block`` (one block) this is exactly the
    unblocked computation. Returns the sink's result.
    """
    blocks = query_blocks(query.n_rows, context.query_block)
    sink = None
    group: list[tuple[slice, Tensor]] = []
    passes = 0
    timings = context.timings
    timings.setdefault("query_gradients", 0.0)
    timings.setdefault("train_gradients_and_scores", 0.0)

    def flush() -> None:
        nonlocal passes
        t0 = time.perf_counter()
        cols = slice(group[0][0].start, group[-1][0].stop)
        Q = group[0][1] if len(group) == 1 else torch.cat([q for _, q in group])
        group.clear()
        whole = cols.start == 0 and cols.stop == query.n_rows
        phase = "scores" if whole else f"scores-q{passes}"
        score_training_pass(
            train, Q, sink, context, cols=None if whole else cols, normalise=normalise,
            phase=phase,
        )  # fmt: skip
        passes += 1
        timings["train_gradients_and_scores"] += time.perf_counter() - t0

    for cols in blocks:
        t0 = time.perf_counter()
        block = query if len(blocks) == 1 else query.restrict(cols)
        Gq = block.stack(desc="query gradients")
        Q = prepare(Gq)
        del Gq  # only prepared queries stay in memory during the training passes
        timings["query_gradients"] += time.perf_counter() - t0
        if sink is None:
            sink = context.sink(task.n_train, query.n_rows, Q.dtype, Q.device)
        held = sum(q.numel() * q.element_size() for _, q in group)
        if group and held + Q.numel() * Q.element_size() > PREPARED_BYTES:
            flush()
        group.append((cols, Q))
    flush()
    context.info["query_passes"] = passes
    return sink.result()
