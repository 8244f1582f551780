"""Batches: named tensors that share a leading dimension, and the helpers that index them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

Batch = dict[str, Tensor]
"""Named tensors sharing a leading batch dimension ``B``."""

Forward = Callable[..., Tensor]
"""The network's forward function (``model(*args)`` or a ``functional_call`` of it)."""


def batch_size(batch: Mapping[str, Tensor]) -> int:
    """Leading dimension shared by every tensor of ``batch``.

    Raises:
        ValueError: if the batch is empty or its tensors disagree on the leading dimension.
    """
    sizes = {k: v.shape[0] for k, v in batch.items()}
    if not sizes:
        raise ValueError("batch mismatch: expected at least one tensor, got an empty batch.")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch mismatch: expected one leading dimension, got {sizes}.")
    return next(iter(sizes.values()))


def index_batch(batch: Mapping[str, Tensor], index: Any) -> Batch:
    """``{k: v[index]}`` for every tensor of ``batch`` (slices, index tensors, masks)."""
    return {k: v[index] for k, v in batch.items()}
