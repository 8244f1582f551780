"""Projected per-example gradients from forward/backward hooks, never forming ``∇_θ ℓ``.

One forward of the measurement on a chunk of ``B`` examples records, for every hooked layer
call, the layer input and the autograd edge of its output; one ``torch.autograd.grad`` of
``Σ_b m_b`` w.r.t. those outputs gives the output gradients (autograd never computes a
weight gradient). Rows of a layer call (``L = B·r``: draws, tokens; spatial positions are a
separate axis for Conv2d) are assigned to examples example-major — the layout the task's
measurements use (one network call on the flattened ``(B·S)`` rows); :func:`check_layout`
verifies it on one example. A module called several times per forward sums over its calls
(the gradient of a shared weight is the sum over uses).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from attribution_core import (
    Batch,
    ConfigError,
    Measurement,
    NumericalError,
    batch_size,
    example_noise,
    index_batch,
)
from attribution_logra.projection import LayerProjection


def projected_gradients(
    model: nn.Module,
    measurement: Measurement,
    batch: Batch,
    noise: Batch,
    layers: list[LayerProjection],
) -> Tensor:
    """``(B, Σ_l k_out·k_in)``: every layer's ``vec(P_out G_b P_inᵀ)``, layers concatenated."""
    n = batch_size(batch)
    calls: list[tuple[int, Tensor, Any]] = []

    def hook(index: int):
        def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if output.requires_grad:
                calls.append((index, inputs[0].detach(), get_gradient_edge(output)))

        return record

    handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            m = measurement.evaluate(model, batch, noise)
            if not calls:
                raise ConfigError("logra: no hooked layer took part in the measurement")
            grads = torch.autograd.grad(m.sum(), [edge for _, _, edge in calls], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out = [None] * len(layers)
    for (index, x, _), g in zip(calls, grads, strict=True):
        if g is None:
            continue
        phi = _layer_call(layers[index], x, g, n)
        out[index] = phi if out[index] is None else out[index] + phi
    rows = [
        o if o is not None else torch.zeros(n, lay.dim, dtype=m.dtype, device=m.device)
        for o, lay in zip(out, layers, strict=True)
    ]
    return torch.cat(rows, dim=1)


def _layer_call(layer: LayerProjection, x: Tensor, g: Tensor, n: int) -> Tensor:
    """``(B, k_out·k_in)`` for one call: ``Σ_r (P_out g_r)(P_in ã_r)ᵀ`` per example."""
    mod = layer.module
    if isinstance(mod, nn.Conv2d):
        patches = nn.functional.unfold(
            x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride
        )  # (L, C_in·kh·kw, P)
        if layer.bias:
            ones = torch.ones_like(patches[:, :1])
            patches = torch.cat([patches, ones], dim=1)
        go = g.flatten(2)  # (L, C_out, P)
        pa = torch.einsum("ki,lip->lkp", layer.p_in, patches)
        pg = torch.einsum("ko,lop->lkp", layer.p_out, go)
        rows = _per_example(pa, n, layer.module)
        grows = _per_example(pg, n, layer.module)
        phi = torch.einsum("brop,brip->boi", grows, rows)
    else:
        a = x.reshape(-1, x.shape[-1])
        if layer.bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        pa = _per_example(a @ layer.p_in.T, n, layer.module)
        pg = _per_example(g.reshape(-1, g.shape[-1]) @ layer.p_out.T, n, layer.module)
        phi = torch.einsum("bro,bri->boi", pg, pa)
    return phi.reshape(n, -1)


def _per_example(rows: Tensor, n: int, module: nn.Module) -> Tensor:
    """``(L, ...) -> (B, L/B, ...)`` example-major."""
    if rows.shape[0] % n:
        raise ConfigError(
            f"logra: a {type(module).__name__} call has {rows.shape[0]} rows for {n} examples; "
            f"LoGra needs each example's rows to be a contiguous block of equal size"
        )
    return rows.reshape(n, rows.shape[0] // n, *rows.shape[1:])


def projected_chunks(
    model: nn.Module,
    measurement: Measurement,
    data: Batch,
    layers: list[LayerProjection],
    *,
    seed: int,
    stream: str,
    chunk_size: int,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(rows, Φ_LoGra g)`` chunks over ``data`` (noise of example ``i`` from
    ``(seed, stream, i)``, as for every gradient stream: common random numbers)."""
    n = batch_size(data)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        chunk = index_batch(data, rows)
        noise = example_noise(measurement, chunk, seed, stream, start)
        phi = projected_gradients(model, measurement, chunk, noise, layers)
        if not bool(torch.isfinite(phi).all()):
            raise NumericalError(
                f"logra: non-finite projected gradient in {stream} rows {start}..{rows.stop - 1}"
                f"; check the model weights and data for NaN/Inf"
            )
        yield rows, phi


def check_layout(
    model: nn.Module,
    measurement: Measurement,
    data: Batch,
    layers: list[LayerProjection],
    *,
    seed: int,
    stream: str,
) -> None:
    """Compare the last example of the first chunk computed in the chunk and alone.

    Raises:
        ConfigError: they differ (the measurement does not lay rows out example-major).
    """
    n = min(batch_size(data), 4)
    if n < 2:
        return
    chunk = index_batch(data, slice(0, n))
    together = projected_gradients(
        model, measurement, chunk, example_noise(measurement, chunk, seed, stream, 0), layers
    )[-1]
    one = index_batch(data, slice(n - 1, n))
    alone = projected_gradients(
        model, measurement, one, example_noise(measurement, one, seed, stream, n - 1), layers
    )[0]
    err = float((together - alone).norm() / alone.norm().clamp_min(1e-300))
    tol = 1e-8 if together.dtype == torch.float64 else 1e-3
    if err > tol:
        raise ConfigError(
            f"logra: measurement {measurement.name!r} does not lay out each example's rows as "
            f"one contiguous block (example {n - 1}: relative difference {err:.3g} between its "
            f"projected gradient in a chunk and alone); LoGra cannot assign hook rows to "
            f"examples for it — use trak instead"
        )
