"""DAS: its leave-one-out step against closed-form least-squares leave-one-out (refitting without
each example, derived here independently), end to end on a linear-Gaussian model, and the
sketched residuals against the loss they sketch.

Tolerances (float64): the closed form refits N systems by numpy's solve, DAS uses one Cholesky
and Sherman–Morrison; both backward-stable on well-conditioned 5×5 systems, so they agree to
~1e-13 — checked at 1e-9 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attribution_diffusion_methods.das import DASScorer, leave_one_out_steps
from torch import nn

from attribution_core import (
    Measurement,
    MethodParts,
    NumericalError,
    ScoringContext,
    Task,
    get_registry,
)
from attribution_core.testing import allclose_report

RTOL = 1e-9


def ridge(X: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    return np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ y)


def closed_form_loo(X: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """``(N, p)``: θ* − θ_{−i}, each θ_{−i} refitted from scratch without row i."""
    theta = ridge(X, y, lam)
    keep = np.ones(len(y), dtype=bool)
    out = []
    for i in range(len(y)):
        keep[:] = True
        keep[i] = False
        out.append(theta - ridge(X[keep], y[keep], lam))
    return np.stack(out)


@pytest.mark.parametrize("lam", [0.0, 0.3, 5.0])
def test_leave_one_out_steps_equal_refitting(lam):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(15, 5))
    y = X @ rng.normal(size=5) + 0.5 * rng.normal(size=15)
    e = y - X @ ridge(X, y, lam)
    steps, leverage, _ = leave_one_out_steps(torch.from_numpy(X), torch.from_numpy(e), lam)
    assert not allclose_report(steps, closed_form_loo(X, y, lam), rtol=RTOL, atol=1e-14)
    H = X @ np.linalg.solve(X.T @ X + lam * np.eye(5), X.T)
    assert not allclose_report(leverage, np.diag(H), rtol=RTOL)


def test_leave_one_out_refuses_leverage_one():
    X = torch.eye(3, dtype=torch.float64)  # each row alone spans its direction
    with pytest.raises(NumericalError, match="leverage"):
        leave_one_out_steps(X, torch.ones(3, dtype=torch.float64), 0.0)


# ---- a linear-Gaussian model: ε_θ(x) = wᵀx + b, targets y -----------------------------------------
class LinearOutput(Measurement):
    """``f(θ, x) = model(x)`` with residual ``y − f`` (the least-squares row of DAS)."""

    name = "linear-output"
    is_target = False

    def evaluate(self, forward, batch, noise):
        return forward(batch["x"])[:, 0]

    def residual(self, forward, batch, noise):
        return batch["y"] - forward(batch["x"])[:, 0]


class LinearGaussian(Task):
    name = "linear-gaussian"
    dtype = torch.float64

    def __init__(self, n: int = 20, d: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g, dtype=torch.float64)
        w = torch.randn(d, generator=g, dtype=torch.float64)
        self.y = self.x @ w + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)

    def train_data(self):
        return {"x": self.x, "y": self.y}

    def build_model(self, seed):
        return nn.Linear(self.x.shape[1], 1).double().eval()

    def train(self, model, weights, seed):
        raise NotImplementedError

    def make_queries(self, model, n, seed):
        g = torch.Generator().manual_seed(seed + 1)
        return {"x": torch.randn(n, self.x.shape[1], generator=g, dtype=torch.float64)}

    def training_loss(self, n_samples=None):
        return LinearOutput()


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_das_equals_squared_change_of_refitted_output(lam):
    task = LinearGaussian()
    X = np.hstack([task.x.numpy(), np.ones((task.n_train, 1))])  # weight then bias (core order)
    y = task.y.numpy()
    theta = ridge(X, y, lam)
    model = task.build_model(0)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(theta[:-1])[None])
        model.bias.copy_(torch.from_numpy(theta[-1:]))
    queries = task.make_queries(model, 3, 0)
    parts = MethodParts("das", 0, LinearOutput(), LinearOutput())
    scorer = DASScorer(parts, damping=lam, damping_mode="absolute", query_draws=1)
    context = ScoringContext(target=LinearOutput())
    got = scorer.scores(task, model, queries, context)
    Xq = np.hstack([queries["x"].numpy(), np.ones((3, 1))])
    ref = (closed_form_loo(X, y, lam) @ Xq.T) ** 2  # (f_{θ*}(x_q) − f_{θ−i}(x_q))²
    assert got.shape == (20, 3) and (got >= 0).all()
    assert not allclose_report(got, ref, rtol=RTOL, atol=1e-15)
    assert context.info["curvature"]["damping"] == lam


def test_das_output_is_a_linear_sketch_of_the_residual():
    """``e(v) = vᵀ(ε − ε_θ)`` is linear in v on fixed (t, ε): with v the pixel basis vectors its
    squares sum to the loss of the same draw exactly (so ``E_v e² = ℓ`` for Rademacher v)."""
    from attribution_diffusion import DDPMDigitsTask

    task = DDPMDigitsTask(
        dtype=torch.float64, width=2, channel_mult=[1], T=10, n_train=4, train_steps=1
    )
    model = task.build_model(0)
    m = get_registry().create("measurement", "das-output", task, n_samples=1)
    batch = {"x": task.train_data()["x"][:1]}
    noise = m.draw(batch, torch.Generator().manual_seed(0))
    assert set(noise) == {"t", "eps", "v"} and set(noise["v"].unique().tolist()) <= {-1.0, 1.0}
    with torch.no_grad():
        loss = task.training_loss(1).evaluate(model, batch, noise)
        basis = torch.eye(noise["eps"][0, 0].numel(), dtype=torch.float64)
        shape = noise["eps"].shape
        e = [m.residual(model, batch, {**noise, "v": b.reshape(shape)}) for b in basis]
    assert float(torch.stack(e).pow(2).sum()) == pytest.approx(float(loss), rel=1e-12)
