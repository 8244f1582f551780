"""Per-example gradients with ``torch.func`` over the included parameters.

* Parameter set: :func:`select_parameters` — Linear/Conv2d weights and biases (what K-FAC can
  model); everything else is listed as excluded and held fixed.
* Monte-Carlo noise for example ``i`` comes from a generator seeded by ``(seed, stream, i)``
  (:func:`example_noise`), so draws are independent of chunking and identical for every method
  and model (common random numbers). Curvature passes use the same convention
  (:func:`example_generator` with a ``pass_index``; streams ``fit`` for a task's (t, ε) draws,
  ``mc-target`` for MC-Fisher pseudo-targets), so a row range computes the same rows wherever
  it runs (:func:`row_chunks` splits one).
* ``G: (B, p)`` rows are flattened in the order of the parameter dict (``layout``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from attribution_core.batches import Batch, batch_size, index_batch
from attribution_core.errors import NumericalError
from attribution_core.interfaces import Measurement
from attribution_core.precision import gradient_autocast
from attribution_core.progress import progress_bar

CURVATURE_MODULES = (nn.Linear, nn.Conv2d)
_STREAMS = {"train": 1, "query": 2, "target": 3, "fit": 4, "mc-target": 5}


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


def example_generator(seed: int, stream: str, index: int, pass_index: int = 0) -> torch.Generator:
    """The CPU generator for example ``index`` of ``stream`` in data pass ``pass_index``.

    Streams: ``train`` / ``query`` / ``target`` (gradients), ``fit`` (a curvature problem's
    Monte-Carlo draws, e.g. DDPM (t, ε), per training example) and ``mc-target`` (MC-Fisher
    pseudo-targets, per loss row). ``pass_index`` separates the passes of one fit (0: factors,
    1: EK-FAC's correction); 0 gives the same generators as before passes existed.
    """
    mixed = (
        int(seed) * 1_000_003
        + _STREAMS[stream] * 7_919
        + int(index) * 2_654_435_761
        + int(pass_index) * 104_729
    ) % (2**63)
    return torch.Generator().manual_seed(mixed)


def row_chunks(rows: slice | None, n: int, size: int) -> Iterator[slice]:
    """Consecutive chunks of at most ``size`` rows over ``rows`` of ``0..n`` (None = all).

    A curvature problem's ``batches(pass_index, rows)`` iterates these: chunks start at
    ``rows.start``, so a restricted pass yields exactly its rows, in order.
    """
    first, stop = _bounds(rows, n)
    for start in range(first, stop, max(1, int(size))):
        yield slice(start, min(start + size, stop))


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
    rows: slice | None = None,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(rows, G)`` chunks over ``data``: ``G: (len(rows), p)``, checked finite.

    With ``rows`` only that range of ``data`` is computed (chunks start at ``rows.start``); the
    yielded slices are always row indices of ``data``, and the noise of example ``i`` is the
    same whichever range it is computed in.
    """
    first, stop = _bounds(rows, batch_size(data))
    layout = layout_of(params)
    with progress_bar(total=stop - first, desc=desc, enabled=progress) as bar:
        for start in range(first, stop, chunk_size):
            rows = slice(start, min(start + chunk_size, stop))
            chunk = index_batch(data, rows)
            noise = example_noise(measurement, chunk, seed, stream, start)
            G = per_example_gradients(model, measurement, chunk, noise, params)
            check_finite(G, rows, layout, desc)
            bar.advance(rows.stop - rows.start)
            yield rows, G
            del G  # not alive while the next chunk is computed (one chunk in memory)


def _bounds(rows: slice | None, n: int) -> tuple[int, int]:
    """``(start, stop)`` of a contiguous row range of ``n`` rows (None = all)."""
    if rows is None:
        return 0, n
    start, stop, step = rows.indices(n)
    if step != 1 or start > stop:
        raise ValueError(f"rows mismatch: expected a contiguous range of 0..{n}, got {rows}.")
    return start, stop
