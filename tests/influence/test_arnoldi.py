"""``arnoldi``: the top-r GGN eigenspace, against dense float64 eigendecompositions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attribution_influence.arnoldi import ArnoldiHessian
from conftest import fit, rhs, tiny_task

from attribution_core import ConfigError, get_registry
from attribution_core.builtin.hessians import dense_ggn
from attribution_core.testing import allclose_report, build_scorer


def projected_inverse(H: torch.Tensor, r: int, total_damping: float) -> torch.Tensor:
    """``U_r diag(1/(μ + λ)) U_rᵀ`` from ``numpy.linalg.eigh`` of the dense GGN."""
    mu, U = (torch.from_numpy(a) for a in np.linalg.eigh(H.numpy()))
    top = torch.argsort(mu.abs(), descending=True)[:r]
    return U[:, top] @ torch.diag(1.0 / (mu[top] + total_damping)) @ U[:, top].T


@pytest.mark.parametrize("task_name", ["ridge", "digits"])
def test_full_rank_equals_dense_influence(request, task_name):
    task, lam = request.getfixturevalue(task_name), 1e-2
    p = 11 if task_name == "ridge" else 275
    model, params, curv = fit(ArnoldiHessian(rank=p, iterations=p, damping=lam), task)
    H = dense_ggn(model, task, params, 0)  # includes 2·l2·I
    G = rhs(p)
    want = torch.linalg.solve(H + lam * torch.eye(p, dtype=H.dtype), G.T).T
    # p float64 Arnoldi steps with full reorthogonalisation: exact up to round-off (κ ≲ 1e3)
    report = allclose_report(curv.solve(G), want, rtol=0, atol=1e-9 * float(want.abs().max()))
    assert not report, report


@pytest.mark.parametrize(("task_name", "rank", "iterations"), [("ridge", 4, 11), ("digits", 5, 60)])
def test_low_rank_equals_top_eigenspace_projection(request, task_name, rank, iterations):
    task, lam = request.getfixturevalue(task_name), 1e-3
    model, params, curv = fit(ArnoldiHessian(rank=rank, iterations=iterations, damping=lam), task)
    H = dense_ggn(model, task, params, 0) - 2 * task.l2 * torch.eye(curv.vectors.shape[0])
    want_map = projected_inverse(H.double(), rank, lam + 2 * task.l2)
    G = rhs(H.shape[0])
    want = G @ want_map
    # well-separated top eigenvalues: Ritz pairs converge to ~1e-10 within `iterations` steps
    report = allclose_report(curv.solve(G), want, rtol=0, atol=1e-7 * float(want.abs().max()))
    assert not report, report
    assert curv.describe()["max_ritz_residual"] < 1e-6


def test_repeated_eigenvalues_restart(request):
    """Rank-deficient GGN (40 CE rows < p = 136): Arnoldi restarts and still spans R^p."""
    task = tiny_task("digits-classifier", hidden=2, classes=[0, 1], n_train=40, steps=50)
    lam = 1e-1
    model, params, curv = fit(ArnoldiHessian(rank=136, iterations=136, damping=lam), task)
    H = dense_ggn(model, task, params, 0)
    G = rhs(136)
    want = torch.linalg.solve(H + lam * torch.eye(136, dtype=H.dtype), G.T).T
    report = allclose_report(curv.solve(G), want, rtol=0, atol=1e-9 * float(want.abs().max()))
    assert not report, report


@pytest.mark.parametrize(
    ("options", "message"),
    [({"rnk": 3}, "rnk"), ({"rank": 0}, "rank"), ({"damping": -1.0}, "damping")],
)
def test_bad_option_is_a_config_error(ridge, options, message):
    with pytest.raises(ConfigError, match=message):
        get_registry().create("hessian", "arnoldi", **options)
    with pytest.raises(ConfigError, match=message):
        build_scorer({"name": "arnoldi-influence", **options}, ridge)


def test_iterations_below_rank_is_refused(ridge):
    with pytest.raises(ConfigError, match="iterations=3 < rank=5"):
        fit(ArnoldiHessian(rank=5, iterations=3), ridge)
