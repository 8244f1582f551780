"""Scoring keeps one gradient chunk alive at a time (with and without the cache).

Every tensor returned by ``per_example_gradients`` is tracked with a weak reference; when the
next chunk is created, the previous one must already be gone. Before the fix the count reached
2 (the previous chunk was still bound to loop variables while the next one was computed) and 3
with the cache (the first chunk also stayed bound for the whole pass, as ``first``).
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch import nn

import attribution_core.per_example as grads_mod
from attribution_core import attribute
from attribution_core.gradients import stack_gradients
from attribution_core.wrap import ModuleTask


@pytest.fixture
def live_chunks(monkeypatch):
    """``(log, state)``: the number of gradient tensors alive right after each creation."""
    orig = grads_mod.per_example_gradients
    state = {"alive": 0}
    log: list[int] = []

    def released() -> None:
        state["alive"] -= 1

    def counted(*args, **kwargs):
        G = orig(*args, **kwargs)
        state["alive"] += 1
        weakref.finalize(G, released)
        log.append(state["alive"])
        return G

    monkeypatch.setattr(grads_mod, "per_example_gradients", counted)
    return log, state


def task() -> ModuleTask:
    torch.manual_seed(0)
    X = torch.randn(50, 4)
    y = X @ torch.tensor([1.0, -1.0, 0.5, 2.0])
    return ModuleTask(
        lambda seed: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)),
        {"x": X, "y": y[:, None]},
        "mse",
        queries={"x": X[:12] + 0.1, "y": y[:12, None]},
        steps=20,
    )


@pytest.mark.parametrize("method", ["grad-dot", "grad-cosine", "kfac-influence"])
@pytest.mark.parametrize("cached", [False, True])
def test_one_training_chunk_alive_at_a_time(live_chunks, method, cached, tmp_path):
    log, state = live_chunks
    cfg = {"queries": {"count": 12}, "methods": [method], "chunk_size": 8}
    if cached:
        cfg["cache_dir"] = str(tmp_path)
    res = attribute(cfg, task=task())
    assert res.scores[method].shape == (50, 12)
    # 2 query chunks (stacked into one preallocated matrix) + 7 training chunks (50 rows / 8)
    assert len(log) >= 9
    assert max(log) == 1, f"gradient chunks alive at each creation: {log}"
    assert state["alive"] == 0
    if cached:  # the streamed cache still holds every row
        (npy,) = (tmp_path / "gradients").glob("*.npy")
        assert np.load(npy).shape[0] == 50


def test_preallocated_stack_equals_concatenation():
    g = torch.Generator().manual_seed(0)
    chunks = [
        (slice(i, min(i + 4, 10)), torch.randn(min(4, 10 - i), 6, generator=g))
        for i in range(0, 10, 4)
    ]
    torch.testing.assert_close(
        stack_gradients(iter(chunks), n=10), stack_gradients(iter(chunks)), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="expected 12 rows, got 10"):
        stack_gradients(iter(chunks), n=12)
