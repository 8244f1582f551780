"""Gradient streams: per-example gradients chunked over a dataset, compressed, cached.

The per-example primitives live in :mod:`attribution_core.per_example` and are re-exported here.

* Parameter set: :func:`select_parameters` — Linear/Conv2d weights and biases (what K-FAC can
  model); everything else is listed as excluded and held fixed.
* Monte-Carlo noise for example ``i`` comes from a generator seeded by ``(seed, stream, i)``
  (:func:`example_noise`), so draws are independent of chunking and identical for every method
  and model (common random numbers).
* ``G: (B, p)`` rows are flattened in the order of the parameter dict (``layout``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attribution_core.gradient_cache import (
    GradientCache,
    cache_key,
    data_fingerprint,
    model_fingerprint,
)
from attribution_core.interfaces import Batch, Measurement, batch_size
from attribution_core.per_example import (
    CURVATURE_MODULES,
    _bounds,
    check_finite,
    example_generator,
    example_noise,
    iter_gradients,
    layout_of,
    per_example_gradients,
    select_parameters,
)
from attribution_core.precision import gradient_precision

__all__ = [
    "CURVATURE_MODULES",
    "GradientCache",
    "GradientStream",
    "cache_key",
    "check_finite",
    "example_generator",
    "example_noise",
    "gradient_chunks",
    "iter_gradients",
    "layout_of",
    "model_fingerprint",
    "per_example_gradients",
    "select_parameters",
    "stack_gradients",
]


def gradient_chunks(
    model: nn.Module,
    measurement: Measurement,
    data: Batch,
    params: Mapping[str, Tensor],
    *,
    seed: int,
    stream: str = "train",
    chunk_size: int = 64,
    progress: bool = False,
    desc: str = "gradients",
    cache: GradientCache | None = None,
    transform: Any = None,
    transform_key: Any = None,
    transform_rows: int = 0,
    rows: slice | None = None,
) -> Iterator[tuple[slice, Tensor]]:
    """``GradientStream(...).chunks()`` for callers that hold a bare ``transform`` function.

    Prefer :class:`GradientStream`, which holds these arguments as one record (and takes a
    compressor instead of ``transform``/``transform_key``/``transform_rows``).
    """
    return GradientStream(
        model,
        measurement,
        data,
        params,
        seed,
        stream,
        chunk_size,
        cache,
        rows=rows,
        transform=_Transform(transform, transform_key, transform_rows) if transform else None,
    ).chunks(progress=progress, desc=desc)


@dataclass(frozen=True)
class _Transform:
    """A chunk transform: the function, what identifies it in cache keys, its group size."""

    apply: Any
    key: Any = None
    rows: int = 0


def _cache_parts(
    model: nn.Module,
    measurement: Measurement,
    data: Batch,
    params: Mapping[str, Tensor],
    seed: int,
    stream: str,
    transform_key: Any,
) -> dict[str, Any]:
    """What identifies a cached gradient matrix (its key is a hash of these)."""
    parts = {
        "model": model_fingerprint(model),
        "measurement": measurement.describe(),
        "seed": seed,
        "stream": stream,
        "params": layout_of(params),
        "n": batch_size(data),
        "data": data_fingerprint(data),
        "transform": transform_key,
    }
    if (precision := gradient_precision()) is not None:
        parts["precision"] = precision  # float32 keys unchanged; bf16 never shares a file
    return parts


def _transformed(
    chunks: Iterator[tuple[slice, Tensor]], transform: Any, group: int
) -> Iterator[tuple[slice, Tensor]]:
    """``(rows, transform(G))`` per chunk, or per group of consecutive chunks (``group`` rows).

    Chunks are copied into one preallocated ``(group, p)`` buffer as they come, so the buffer
    and one chunk are in memory, never a list of chunks. The buffer is reused for the next
    group, so a transform that returns (a view of) its input is copied before it is yielded.
    """
    buf: Tensor | None = None
    start = filled = 0

    def flush() -> Tensor:
        T = transform(buf[:filled])
        if T.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():
            T = T.clone()  # would be overwritten by the next group
        return T

    for rows, G in chunks:
        if buf is None and group <= G.shape[0]:
            yield rows, transform(G)
            del G
            continue
        if buf is None:
            buf = torch.empty(group, G.shape[1], dtype=G.dtype, device=G.device)
            start = rows.start  # a restricted stream's rows do not start at 0
        if filled + G.shape[0] > group:  # flush before overflowing
            yield slice(start, start + filled), flush()
            start, filled = start + filled, 0
        buf[filled : filled + G.shape[0]] = G
        filled += G.shape[0]
        del G
    if filled:
        yield slice(start, start + filled), flush()


def stack_gradients(chunks: Iterator[tuple[slice, Tensor]], n: int | None = None) -> Tensor:
    """All chunks as one ``(n, p)`` tensor (small problems and queries).

    With ``n`` (the number of rows) each chunk is copied into one preallocated tensor as it
    comes, so the result and one chunk are in memory; without, the chunks are concatenated
    at the end (every chunk and the result: twice the matrix).
    """
    if n is None:
        return torch.cat([G for _, G in chunks], dim=0)
    out: Tensor | None = None
    filled = 0
    for rows, G in chunks:
        if out is None:
            out = torch.empty(n, G.shape[1], dtype=G.dtype, device=G.device)
        out[rows] = G
        filled += rows.stop - rows.start
        del G
    if out is None or filled != n:
        raise ValueError(f"stack_gradients: expected {n} rows, got {filled}")
    return out


@dataclass(frozen=True)
class GradientStream:
    """Per-example gradients of one measurement over one dataset, as one read-only record.

    ``chunks()`` yields ``(rows, G)`` with ``G: (len(rows), p)`` — or ``(len(rows), k)`` once
    :meth:`compressed` — where ``rows`` index ``data``. Noise of example ``i`` is drawn from
    ``(seed, stream, i)`` (:func:`example_noise`), so any row range (:meth:`restrict`, the unit
    of sharding) gives the same rows as the whole pass.

    Attributes:
        model: the trained model (eval mode); ``params`` are its included parameters.
        measurement: the function differentiated (``train_function`` or ``query_function``).
        data: the examples, leading dimension ``n``.
        params: included parameters, ``name -> tensor`` (the flattening order).
        seed: the method's seed.
        stream: noise stream (``train``, ``query``, ...).
        chunk_size: examples per ``vmap`` call.
        cache: the gradient cache (None = compute every pass).
        rows: the row range of ``data`` this stream covers (None = all).
        transform: applied to every chunk (grouped to its ``rows``), set by :meth:`compressed`.

    With a cache, the first whole pass writes the whole (transformed) matrix (one chunk in memory
    at a time) and later passes read it back in chunks; a restricted stream (a shard) reads its
    rows from a finished whole-matrix entry, else from its own entry (keyed by its rows), which
    its first pass writes — so a shard's fit pass and its scoring pass compute gradients once. The transform's
    ``key`` (a compressor's ``describe()``) keeps differently compressed gradients apart. With a
    group size above ``chunk_size``, consecutive chunks are grouped into one buffer of up to that
    many rows before the transform (:meth:`GradientCompressor.preferred_rows`).
    """

    model: nn.Module
    measurement: Measurement
    data: Batch
    params: Mapping[str, Tensor]
    seed: int
    stream: str = "train"
    chunk_size: int = 64
    cache: GradientCache | None = None
    rows: slice | None = None
    transform: _Transform | None = None

    @property
    def n_rows(self) -> int:
        """Rows this stream yields."""
        start, stop = _bounds(self.rows, batch_size(self.data))
        return stop - start

    def restrict(self, rows: slice) -> GradientStream:
        """The same stream over ``rows`` of ``data`` only (a shard)."""
        _bounds(rows, batch_size(self.data))
        return replace(self, rows=rows)

    def compressed(self, compressor: Any) -> GradientStream:
        """The same stream with every chunk passed through ``compressor.compress``."""
        t = _Transform(compressor.compress, compressor.describe(), compressor.preferred_rows())
        return replace(self, transform=t)

    def chunks(
        self, *, progress: bool = False, desc: str = "gradients"
    ) -> Iterator[tuple[slice, Tensor]]:
        """Yield ``(rows, G)`` over this stream's rows (one chunk or group in memory)."""
        if self.cache is None:
            return self._computed(progress, desc)
        parts = self._cache_parts()
        cached = self.cache.load(cache_key(**parts), parts)
        if cached is not None:
            return self._read(cached)
        start, stop = _bounds(self.rows, batch_size(self.data))
        if stop - start != batch_size(self.data):  # a shard: its own rows' entry
            parts = {**parts, "rows": [start, stop]}
            cached = self.cache.load(cache_key(**parts), parts)
            if cached is not None:
                return self._read(cached, offset=start)
        return self._written(parts, progress, desc)

    def _computed(self, progress: bool, desc: str) -> Iterator[tuple[slice, Tensor]]:
        chunks = iter_gradients(
            self.model,
            self.measurement,
            self.data,
            self.params,
            seed=self.seed,
            stream=self.stream,
            chunk_size=self.chunk_size,
            progress=progress,
            desc=desc,
            rows=self.rows,
        )
        t = self.transform
        return chunks if t is None else _transformed(chunks, t.apply, t.rows)

    def _written(
        self, parts: dict[str, Any], progress: bool, desc: str
    ) -> Iterator[tuple[slice, Tensor]]:
        """Compute the whole pass, writing each chunk into the cache as it is yielded."""
        chunks = self._computed(progress, desc)
        first = next(chunks, None)
        if first is None:
            return
        rows, G = first
        del first  # the first chunk must not stay alive for the whole pass
        shape = (self.n_rows, G.shape[1])
        dtype = np.dtype(str(G.dtype).removeprefix("torch."))
        with self.cache.writer(cache_key(**parts), parts, shape, dtype) as write:
            write(G.detach().cpu().numpy())
            yield rows, G
            del G
            for rows, G in chunks:
                write(G.detach().cpu().numpy())
                yield rows, G
                del G

    def _read(self, cached: np.ndarray, offset: int = 0) -> Iterator[tuple[slice, Tensor]]:
        """Chunks of a cached matrix whose row 0 is data row ``offset`` (a shard's entry)."""
        device = next(iter(self.params.values())).device
        first, stop = _bounds(self.rows, offset + cached.shape[0])
        for start in range(first, stop, self.chunk_size):
            piece = slice(start, min(start + self.chunk_size, stop))
            local = slice(piece.start - offset, piece.stop - offset)
            yield piece, torch.from_numpy(np.array(cached[local])).to(device)

    def _cache_parts(self) -> dict[str, Any]:
        return _cache_parts(
            self.model,
            self.measurement,
            self.data,
            self.params,
            self.seed,
            self.stream,
            self.transform.key if self.transform is not None else None,
        )

    def stack(self, *, progress: bool = False, desc: str = "gradients") -> Tensor:
        """Every row of the stream as one ``(n_rows, p)`` tensor (queries, small problems)."""
        start, _ = _bounds(self.rows, batch_size(self.data))
        return stack_gradients(
            _shifted(self.chunks(progress=progress, desc=desc), start), n=self.n_rows
        )


def _shifted(chunks: Iterator[tuple[slice, Tensor]], start: int) -> Iterator[tuple[slice, Tensor]]:
    """Chunks with their row slices shifted by ``-start`` (no chunk kept between yields)."""
    for rows, G in chunks:
        yield slice(rows.start - start, rows.stop - start), G
        del G
