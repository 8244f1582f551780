"""Per-example gradients with ``torch.func``, chunked over a dataset, optionally cached to disk.

* Parameter set: :func:`select_parameters` — Linear/Conv2d weights and biases (what K-FAC can
  model); everything else is listed as excluded and held fixed.
* Monte-Carlo noise for example ``i`` comes from a generator seeded by ``(seed, stream, i)``
  (:func:`example_noise`), so draws are independent of chunking and identical for every method
  and model (common random numbers).
* ``G: (B, p)`` rows are flattened in the order of the parameter dict (``layout``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from attribution_core.errors import NumericalError
from attribution_core.interfaces import Batch, Measurement, batch_size, index_batch
from attribution_core.precision import gradient_autocast, gradient_precision
from attribution_core.progress import progress_bar
from attribution_core.storage import atomic_save_npy

CURVATURE_MODULES = (nn.Linear, nn.Conv2d)
_STREAMS = {"train": 1, "query": 2, "target": 3, "fit": 4}


def select_parameters(model: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """Split parameters into included (Linear/Conv2d weights and biases) and excluded names.

    Returns:
        ``(included, excluded)``: ``included`` maps ``name -> parameter`` in module order;
        ``excluded`` lists the names of all other trainable parameters.
    """
    included: dict[str, Tensor] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, CURVATURE_MODULES):
            for p_name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    included[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    excluded = [n for n, p in model.named_parameters() if p.requires_grad and n not in included]
    return included, excluded


def layout_of(params: Mapping[str, Tensor]) -> list[tuple[str, int]]:
    """``[(name, numel), ...]`` in flattening order."""
    return [(n, p.numel()) for n, p in params.items()]


def example_generator(seed: int, stream: str, index: int) -> torch.Generator:
    """The CPU generator for example ``index`` of ``stream`` (train/query/target/fit)."""
    mixed = (int(seed) * 1_000_003 + _STREAMS[stream] * 7_919 + int(index) * 2_654_435_761) % (
        2**63
    )
    return torch.Generator().manual_seed(mixed)


def example_noise(
    measurement: Measurement, batch: Batch, seed: int, stream: str, start: int
) -> Batch:
    """Noise for rows ``start .. start+B`` of a dataset, drawn per example (see module doc)."""
    n = batch_size(batch)
    parts = [
        measurement.draw(
            index_batch(batch, slice(i, i + 1)), example_generator(seed, stream, start + i)
        )
        for i in range(n)
    ]
    if not parts or not parts[0]:
        return {}
    device = next(iter(batch.values())).device
    return {k: torch.cat([p[k] for p in parts]).to(device) for k in parts[0]}


def per_example_gradients(
    model: nn.Module,
    measurement: Measurement,
    batch: Batch,
    noise: Batch,
    params: Mapping[str, Tensor],
) -> Tensor:
    """``G: (B, p)`` — row ``i`` is ``∇_θ m(θ, x_i)`` over the included ``params``.

    Monte-Carlo measurements are averaged over their draws before differentiation (the
    draw-averaged gradient). Uses ``vmap(grad(functional_call))``; the model must be in eval mode.
    Inside a ``precision: bf16`` run the forward and backward run under bfloat16 autocast
    (:mod:`attribution_core.precision`); ``G`` keeps the parameters' dtype.
    """
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    fixed.update(dict(model.named_buffers()))
    detached = {k: v.detach() for k, v in params.items()}

    def single(p: dict[str, Tensor], example: Batch, nz: Batch) -> Tensor:
        state = {**fixed, **p}

        def forward(*args: Any, **kwargs: Any) -> Tensor:
            return functional_call(model, state, args, kwargs)

        ex1 = {k: v.unsqueeze(0) for k, v in example.items()}
        nz1 = {k: v.unsqueeze(0) for k, v in nz.items()}
        return measurement.evaluate(forward, ex1, nz1)[0]

    with gradient_autocast():
        grads = vmap(grad(single), in_dims=(None, 0, 0))(detached, batch, noise)
    n = batch_size(batch)
    first = grads[next(iter(params))]
    G = torch.empty(
        n, sum(p.numel() for p in params.values()), dtype=first.dtype, device=first.device
    )
    offset = 0
    for k in params:  # pop while copying: one chunk plus one tensor's gradients, not two chunks
        g = grads.pop(k).reshape(n, -1)
        G[:, offset : offset + g.shape[1]] = g
        offset += g.shape[1]
    return G


def check_finite(G: Tensor, rows: slice, layout: list[tuple[str, int]], what: str) -> None:
    """Raise :class:`NumericalError` naming the first non-finite row and parameter tensor."""
    if G.numel() == 0 or bool(torch.isfinite(G.sum())):
        return  # one reduction: NaN/Inf propagate into the sum (an overflow falls through)
    bad = ~torch.isfinite(G)
    if not bad.any():
        return
    row, col = (int(i) for i in bad.nonzero()[0])
    offset = 0
    name = "?"
    for n, k in layout:
        if col < offset + k:
            name = n
            break
        offset += k
    raise NumericalError(
        f"non-finite value in {what} at example {rows.start + row}, parameter {name!r} "
        f"({int(bad.sum())} non-finite entries in rows {rows.start}..{rows.stop - 1}); check the "
        f"model weights and data for NaN/Inf"
    )


def iter_gradients(
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
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(rows, G)`` chunks over ``data``: ``G: (len(rows), p)``, checked finite."""
    n = batch_size(data)
    layout = layout_of(params)
    with progress_bar(total=n, desc=desc, enabled=progress) as bar:
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            chunk = index_batch(data, rows)
            noise = example_noise(measurement, chunk, seed, stream, start)
            G = per_example_gradients(model, measurement, chunk, noise, params)
            check_finite(G, rows, layout, desc)
            bar.advance(rows.stop - rows.start)
            yield rows, G
            del G  # not alive while the next chunk is computed (one chunk in memory)


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

    def save(self, key: str, parts: dict[str, Any], matrix: np.ndarray) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(path, matrix)
        self._write_meta(path, parts)

    @staticmethod
    def _write_meta(path: Path, parts: dict[str, Any]) -> None:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(parts, default=str, sort_keys=True))
        tmp.replace(path.with_suffix(".json"))

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
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._write_meta(path, parts)


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
) -> Iterator[tuple[slice, Tensor]]:
    """Like :func:`iter_gradients`, optionally transformed (compressed) and cached.

    With a cache, the first pass writes the whole (transformed) matrix; later passes read it
    back in chunks. ``transform_key`` must identify ``transform`` (e.g. the compressor's
    ``describe()``) so that differently compressed gradients never share a file. With
    ``transform_rows`` > ``chunk_size`` consecutive chunks are grouped into one buffer of up to
    that many rows before ``transform`` (see :meth:`GradientCompressor.preferred_rows`); the
    yielded pieces are then groups, and the buffer is held next to one chunk.
    """
    if cache is None:
        chunks = iter_gradients(
            model,
            measurement,
            data,
            params,
            seed=seed,
            stream=stream,
            chunk_size=chunk_size,
            progress=progress,
            desc=desc,
        )
        if transform is None:
            yield from chunks
        else:
            yield from _transformed(chunks, transform, transform_rows)
        return
    parts = {
        "model": model_fingerprint(model),
        "measurement": measurement.describe(),
        "seed": seed,
        "stream": stream,
        "params": layout_of(params),
        "n": batch_size(data),
        "data": _data_fingerprint(data),
        "transform": transform_key,
    }
    if (precision := gradient_precision()) is not None:
        parts["precision"] = precision  # float32 keys unchanged; bf16 never shares a file
    key = cache_key(**parts)
    cached = cache.load(key, parts)
    if cached is None:
        # rows go straight into a memory-mapped file: one chunk in memory at a time
        chunks = gradient_chunks(
            model,
            measurement,
            data,
            params,
            seed=seed,
            stream=stream,
            chunk_size=chunk_size,
            progress=progress,
            desc=desc,
            transform=transform,
            transform_rows=transform_rows,
        )
        first = next(chunks, None)
        if first is None:
            return
        rows, G = first
        del first  # the first chunk must not stay alive for the whole pass
        shape = (batch_size(data), G.shape[1])
        dtype = np.dtype(str(G.dtype).removeprefix("torch."))
        with cache.writer(key, parts, shape, dtype) as write:
            write(G.detach().cpu().numpy())
            yield rows, G
            del G
            for rows, G in chunks:
                write(G.detach().cpu().numpy())
                yield rows, G
                del G
        return
    device = next(iter(params.values())).device
    n = cached.shape[0]
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        yield rows, torch.from_numpy(np.array(cached[rows])).to(device)


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
        if filled + G.shape[0] > group:  # flush before overflowing
            yield slice(start, start + filled), flush()
            start, filled = start + filled, 0
        buf[filled : filled + G.shape[0]] = G
        filled += G.shape[0]
        del G
    if filled:
        yield slice(start, start + filled), flush()


def _data_fingerprint(data: Batch) -> str:
    h = hashlib.sha256()
    for k in sorted(data):
        t = data[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


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
