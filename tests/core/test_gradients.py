"""Per-example gradients against a for-loop of autograd; chunking and caching invariances."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from attribution_core.gradients import (
    GradientCache,
    example_noise,
    gradient_chunks,
    per_example_gradients,
    select_parameters,
    stack_gradients,
)
from attribution_core.interfaces import Measurement


class NoisySquare(Measurement):
    """m = mean_s ‖f(x + σ ε_s)‖² with n_samples draws (a Monte-Carlo measurement)."""

    name = "noisy-square"
    n_samples = 3

    def draw(self, batch, generator):
        x = batch["x"]
        return {"eps": torch.randn((x.shape[0], self.n_samples, *x.shape[1:]), generator=generator)}

    def evaluate(self, forward, batch, noise):
        x = batch["x"][:, None] + 0.1 * noise["eps"].to(batch["x"])
        b, s = x.shape[:2]
        out = forward(x.reshape(b * s, -1)).reshape(b, s, -1)
        return (out**2).sum(-1).mean(1)


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = {"x": torch.randn(11, 5, dtype=torch.float64)}
    return model.eval(), data


def test_parameter_selection_excludes_non_curvature_modules():
    model, _ = model_and_data()
    included, excluded = select_parameters(model)
    assert list(included) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert excluded == ["1.weight", "1.bias"]


def test_per_example_gradients_match_autograd_loop():
    model, data = model_and_data()
    params, _ = select_parameters(model)
    m = NoisySquare()
    noise = example_noise(m, data, seed=4, stream="train", start=0)
    G = per_example_gradients(model, m, data, noise, params)
    for i in range(11):
        model.zero_grad()
        m.evaluate(
            model, {"x": data["x"][i : i + 1]}, {"eps": noise["eps"][i : i + 1]}
        ).sum().backward()
        ref = torch.cat([p.grad.reshape(-1) for p in params.values()])
        torch.testing.assert_close(G[i], ref, rtol=1e-12, atol=1e-14)  # float64 round-off


def test_noise_and_gradients_do_not_depend_on_chunk_size():
    model, data = model_and_data()
    params, _ = select_parameters(model)
    m = NoisySquare()
    a = stack_gradients(gradient_chunks(model, m, data, params, seed=1, chunk_size=2))
    b = stack_gradients(gradient_chunks(model, m, data, params, seed=1, chunk_size=7))
    c = stack_gradients(gradient_chunks(model, m, data, params, seed=2, chunk_size=7))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(a, c)


def test_cache_reuses_and_separates_transforms(tmp_path):
    model, data = model_and_data()
    params, _ = select_parameters(model)
    m = NoisySquare()
    cache = GradientCache(tmp_path)
    first = stack_gradients(
        gradient_chunks(model, m, data, params, seed=1, chunk_size=4, cache=cache)
    )
    files = sorted((tmp_path / "gradients").glob("*.npy"))
    assert len(files) == 1
    calls = []

    def spy(G):
        calls.append(1)
        return 2 * G

    again = stack_gradients(
        gradient_chunks(model, m, data, params, seed=1, chunk_size=4, cache=cache)
    )
    assert np.array_equal(first.numpy(), again.numpy())
    doubled = stack_gradients(
        gradient_chunks(
            model,
            m,
            data,
            params,
            seed=1,
            chunk_size=4,
            cache=cache,
            transform=spy,
            transform_key="x2",
        )
    )
    assert calls and torch.allclose(doubled, 2 * first)
    assert len(sorted((tmp_path / "gradients").glob("*.npy"))) == 2


def test_transform_rows_groups_chunks_before_the_transform(tmp_path):
    """transform_rows: the transform sees groups of up to that many rows (here 5 = two chunks
    of 2, then 2 + 2, then the last 3 rows as 2 + 1), the result is the same matrix, and the
    cache written from groups reads back identically."""
    model, data = model_and_data()
    params, _ = select_parameters(model)
    m = NoisySquare()
    seen: list[int] = []

    def spy(G):
        seen.append(G.shape[0])
        return 3 * G

    plain = stack_gradients(gradient_chunks(model, m, data, params, seed=1, chunk_size=2))
    pieces = list(
        gradient_chunks(
            model, m, data, params, seed=1, chunk_size=2, transform=spy, transform_rows=5
        )
    )
    assert seen == [4, 4, 3]
    assert [(r.start, r.stop) for r, _ in pieces] == [(0, 4), (4, 8), (8, 11)]
    grouped = torch.cat([G for _, G in pieces])
    torch.testing.assert_close(grouped, 3 * plain, rtol=1e-12, atol=1e-14)
    cache = GradientCache(tmp_path)
    kw = dict(seed=1, chunk_size=2, cache=cache, transform=spy, transform_key="x3")
    written = stack_gradients(gradient_chunks(model, m, data, params, transform_rows=5, **kw))
    read = stack_gradients(gradient_chunks(model, m, data, params, transform_rows=5, **kw))
    assert torch.equal(written, read) and torch.equal(written, grouped)
    seen.clear()
    list(gradient_chunks(model, m, data, params, seed=1, chunk_size=4, transform=spy))
    assert seen == [4, 4, 3]  # transform_rows 0 (default): one call per chunk
    # a transform returning its input (a view of the reused buffer) is not overwritten later
    kept = [
        G
        for _, G in gradient_chunks(
            model, m, data, params, seed=1, chunk_size=2, transform=lambda G: G, transform_rows=5
        )
    ]
    torch.testing.assert_close(torch.cat(kept), plain, rtol=0, atol=0)
