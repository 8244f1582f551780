"""Light checks of the perf scripts' helpers and of the streaming gradient-cache writer.

No timing is asserted anywhere (speed is measured by benchmarks/perf, never by tests).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attribution_core.errors import NumericalError
from attribution_core.gradients import (
    GradientCache,
    check_finite,
    gradient_chunks,
    select_parameters,
    stack_gradients,
)
from attribution_core.interfaces import Measurement

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "perf"))
from _common import table
from vs_peers import cosine_min, spearman_mean


class Square(Measurement):
    """m = ‖f(x)‖² (deterministic: no draws)."""

    name = "square"

    def draw(self, batch, generator):
        return {}

    def evaluate(self, forward, batch, noise):
        return (forward(batch["x"]) ** 2).sum(-1)


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    data = {"x": torch.randn(11, 5, dtype=torch.float64)}
    params, _ = select_parameters(model)
    return model, data, params


def test_streamed_cache_file_equals_the_uncached_matrix(tmp_path):
    model, data, params = setup()
    plain = stack_gradients(gradient_chunks(model, Square(), data, params, seed=0, chunk_size=4))
    cache = GradientCache(tmp_path)
    first = stack_gradients(
        gradient_chunks(model, Square(), data, params, seed=0, chunk_size=4, cache=cache)
    )
    files = list((tmp_path / "gradients").glob("*.npy"))
    assert len(files) == 1
    on_disk = np.load(files[0])  # a regular .npy: header + rows written chunk by chunk
    assert on_disk.shape == (11, 4 * 5 + 4 + 2 * 4 + 2)
    np.testing.assert_array_equal(on_disk, plain.numpy())  # bitwise: same bytes, no arithmetic
    np.testing.assert_array_equal(first.numpy(), plain.numpy())
    again = stack_gradients(
        gradient_chunks(model, Square(), data, params, seed=0, chunk_size=4, cache=cache)
    )
    np.testing.assert_array_equal(again.numpy(), plain.numpy())


def test_abandoned_pass_leaves_no_cache_file(tmp_path):
    model, data, params = setup()
    cache = GradientCache(tmp_path)
    chunks = gradient_chunks(model, Square(), data, params, seed=0, chunk_size=4, cache=cache)
    next(chunks)
    chunks.close()  # consumer stops early: nothing half-written may be published
    assert list((tmp_path / "gradients").iterdir()) == []


def test_check_finite_fast_path_still_names_the_bad_entry():
    G = torch.ones(3, 4)
    check_finite(G, slice(0, 3), [("w", 4)], "train")  # finite: no error
    G[1, 2] = float("nan")
    with pytest.raises(NumericalError, match=r"example 1, parameter 'w'"):
        check_finite(G, slice(0, 3), [("w", 4)], "train")
    big = torch.full((2, 2), 3e38)  # sum overflows to inf, entries are finite: no error
    check_finite(big, slice(0, 2), [("w", 4)], "train")


def test_agreement_helpers_and_table():
    a = np.arange(12.0).reshape(6, 2)
    assert spearman_mean(a, 2 * a + 1) == pytest.approx(1.0)
    assert cosine_min(a, 3 * a) == pytest.approx(1.0)
    assert spearman_mean(a, -a) == pytest.approx(-1.0)
    md = table([{"x": 1.23456, "y": "a"}])
    assert md.splitlines()[2] == "| 1.23 | a |"
