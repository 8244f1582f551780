"""journey-TRAK: the query function against a hand-written loop, and the per-step scores against
dense empirical-Fisher influence computed here by autograd loops (float64).

The reference recomputes the schedule (numpy, linear β), the state x_t of the stored trajectory,
x̂₀ = (x_t − √(1−ᾱ_t) ε_θ(x_t, t)) / √ᾱ_t and the re-noised loss by hand; only the Monte-Carlo
draws are shared with the pipeline (``example_noise``: common random numbers by design).
Tolerances: the measurement is the same float64 arithmetic in another order (1e-12 relative);
the scores follow tests/trak/test_trak_exactness.py (orthogonal Φ with k = p, Cholesky in a
rotated basis vs numpy's solve: agreement ~cond·1e-16, checked at 1e-8 relative).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution_core import (
    ConfigError,
    DataError,
    attribute,
    example_noise,
    get_registry,
    index_batch,
    select_parameters,
)
from attribution_core.testing import allclose_report

TASK = {
    "name": "ddpm-digits",
    "classes": [0, 1],
    "n_train": 8,
    "train_steps": 4,
    "batch_size": 4,
    "width": 2,
    "channel_mult": [1],
    "T": 10,
    "n_samples": 2,
}


def alpha_bar(T: int, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """``ᾱ_0..ᾱ_T`` of the linear schedule, by hand (ᾱ_0 = 1)."""
    beta = np.concatenate([[0.0], np.linspace(start, end, T)])
    return np.cumprod(1.0 - beta)


def hand_journey_loss(model, traj: torch.Tensor, step: int, eps: torch.Tensor) -> torch.Tensor:
    """``(B,)`` journey loss at ``step`` for trajectories ``(B, T+1, ...)`` and ε ``(B, S, ...)``."""
    T = traj.shape[1] - 1
    ab = float(alpha_bar(T)[step])
    out = []
    for b in range(traj.shape[0]):
        x_t = traj[b : b + 1, T - step]
        t = torch.tensor([step])
        with torch.no_grad():
            x0 = (x_t - np.sqrt(1 - ab) * model(x_t, t)) / np.sqrt(ab)
        total = 0.0
        for s in range(eps.shape[1]):
            e = eps[b : b + 1, s]
            noisy = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * e
            total = total + (e - model(noisy, t)).pow(2).sum()
        out.append(total / eps.shape[1])
    return torch.stack(out)


def hand_loss(model, x: torch.Tensor, noise: dict) -> torch.Tensor:
    """The ε-loss of one example ``x: (1, ...)`` with draws ``{"t": (1, S), "eps": (1, S, ...)}``."""
    abar = alpha_bar(TASK["T"])
    total = 0.0
    S = noise["t"].shape[1]
    for s in range(S):
        t = int(noise["t"][0, s])
        e = noise["eps"][:, s]
        noisy = np.sqrt(abar[t]) * x + np.sqrt(1 - abar[t]) * e
        total = total + (e - model(noisy, torch.tensor([t]))).pow(2).sum()
    return total / S


def flat_grad(value: torch.Tensor, params: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]).numpy()


@pytest.fixture(scope="module")
def trained():
    reg = get_registry()
    opts = {k: v for k, v in TASK.items() if k != "name"}
    task = reg.get("task", "ddpm-digits").factory(dtype=torch.float64, **opts)
    model = task.train(task.build_model(0), torch.ones(task.n_train, dtype=task.dtype), 0)
    return reg, task, model, task.make_queries(model, 3, seed=1)


def test_journey_loss_equals_hand_loop(trained):
    reg, task, model, queries = trained
    for step in (1, 4, 10):
        m = reg.create("measurement", "journey-loss", task, step=step, n_samples=3)
        assert m.describe()["step"] == step and not m.is_target
        noise = m.draw(queries, torch.Generator().manual_seed(3))
        got = m.evaluate(model, queries, noise)
        ref = hand_journey_loss(model, queries["trajectory"], step, noise["eps"])
        assert not allclose_report(got.detach(), ref.detach(), rtol=1e-12), step


def test_journey_loss_default_step_and_errors(trained):
    reg, task, _, queries = trained
    assert reg.create("measurement", "journey-loss", task).step == TASK["T"] // 2
    with pytest.raises(ConfigError, match=r"journey-loss.step: step 11 is outside \[1, 10\]"):
        reg.create("measurement", "journey-loss", task, step=11)
    m = reg.create("measurement", "journey-loss", task, step=2)
    with pytest.raises(DataError, match="no 'trajectory'"):
        m(task.build_model(0), {"x": queries["x"]})


def test_journey_trak_per_step_scores_equal_dense_loop(trained):
    _, task, _, _ = trained
    p = sum(v.numel() for v in select_parameters(task.build_model(0))[0].values())
    methods = [
        {
            "name": "journey-trak",
            "label": f"jt{step}",
            "projection": "orthogonal",
            "proj_dim": p,
            "query_function": {"name": "journey-loss", "step": step},
        }
        for step in (3, 8)
    ]
    cfg = {
        "task": TASK,
        "queries": {"source": "generated", "count": 3, "seed": 1},
        "target": "loss",
        "dtype": "float64",
        "methods": methods,
    }
    res = attribute(cfg)
    model, data, queries = res.model, res.task.train_data(), res.queries
    params = list(select_parameters(model)[0].values())
    seed = res.manifests["jt3"]["seeds"]["method"]
    loss = res.task.training_loss()
    rows = [index_batch(data, slice(i, i + 1)) for i in range(res.task.n_train)]
    G = np.stack(
        [
            flat_grad(hand_loss(model, r["x"], example_noise(loss, r, seed, "train", i)), params)
            for i, r in enumerate(rows)
        ]
    )
    F = G.T @ G / G.shape[0]
    lam = 0.1 * np.trace(F) / p  # projected-fisher's default: relative, c = 0.1
    for step in (3, 8):
        jl = get_registry().create("measurement", "journey-loss", res.task, step=step)
        qrows = [index_batch(queries, slice(q, q + 1)) for q in range(3)]
        eps = [example_noise(jl, r, seed, "query", q)["eps"] for q, r in enumerate(qrows)]
        Gq = np.stack(
            [
                flat_grad(hand_journey_loss(model, r["trajectory"], step, e)[0], params)
                for r, e in zip(qrows, eps, strict=True)
            ]
        )
        ref = G @ np.linalg.solve(F + lam * np.eye(p), Gq.T)
        got = res.scores[f"jt{step}"]
        assert got.shape == (res.task.n_train, 3)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 1e-8, (step, err)
    assert not np.allclose(res.scores["jt3"], res.scores["jt8"])
