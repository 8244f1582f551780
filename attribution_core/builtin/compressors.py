"""Builtin gradient compressors: ``none`` and ``int8`` (the paper's query compression)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attribution_core.interfaces import GradientCompressor


class NoCompression(GradientCompressor):
    """Identity: ``(n, p) -> (n, p)``."""

    name = "none"

    def compress(self, gradients: Tensor) -> Tensor:
        """Return ``gradients`` unchanged."""
        return gradients


class Int8Compression(GradientCompressor):
    """Symmetric absmax int8 quantisation per (row, parameter tensor), dequantised.

    For each row ``i`` and each parameter tensor's segment ``s`` of the flattened gradient:
    ``scale = max|g_is| / 127``, ``q = round(g_is / scale)`` in ``[-127, 127]``, returned as
    ``q · scale`` (same shape and dtype as the input). All-zero segments stay zero.
    """

    name = "int8"

    def __init__(self) -> None:
        self._bounds: list[int] = []

    def fit(self, n_params: int, seed: int, *, layout: Sequence[tuple[str, int]] = ()) -> None:
        """Record segment boundaries from ``layout`` (one segment if empty)."""
        sizes = [k for _, k in layout] or [n_params]
        if sum(sizes) != n_params:
            raise ValueError(
                f"layout mismatch: expected segments summing to {n_params}, got {sum(sizes)}."
            )
        self._bounds = [0]
        for k in sizes:
            self._bounds.append(self._bounds[-1] + k)

    def compress(self, gradients: Tensor) -> Tensor:
        """``(n, p) -> (n, p)`` dequantised int8 values."""
        bounds = self._bounds or [0, gradients.shape[1]]
        out = torch.empty_like(gradients)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            seg = gradients[:, a:b]
            scale = seg.abs().amax(dim=1, keepdim=True) / 127.0
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            out[:, a:b] = torch.round(seg / safe).clamp_(-127, 127) * scale
        return out

    def describe(self) -> dict[str, Any]:
        """Name and number of segments."""
        return {"name": self.name, "segments": max(len(self._bounds) - 1, 1)}
