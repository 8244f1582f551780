"""``ggn-cg``: CG on curvlinops' GGN operator solves the exact damped GGN (float64)."""

from __future__ import annotations

import pytest
import torch
from attribution_kfac.ggn_cg import GGNCGHessian
from kfac_toys import fit

from attribution_core.builtin.hessians import dense_ggn


@pytest.mark.parametrize("task_name", ["mlp_task", "conv_task", "linear_task"])
def test_cg_solves_damped_dense_ggn(request, task_name):
    task = request.getfixturevalue(task_name)
    lam = 1e-2
    model, params, curv = fit(
        GGNCGHessian(damping=lam, rtol=1e-12, maxiter=1000, max_columns=2), task
    )
    H = dense_ggn(model, task, params, seed=0)  # includes ∇²R = 2·l2·I
    p = H.shape[0]
    G = torch.randn(5, p, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = torch.linalg.solve(H + lam * torch.eye(p, dtype=H.dtype), G.T).T
    got = curv.solve(G)
    # CG to rtol 1e-12 on a system with condition number ≲ 1e4: ≲ 1e-8 relative error
    assert (got - want).abs().max().item() < 1e-7 * want.abs().max().item()
    assert len(curv.describe()["cg_iterations"]) == 3  # 5 columns, 2 at a time


def test_cg_relative_damping_uses_trace_estimate(conv_task):
    model, params, curv = fit(
        GGNCGHessian(damping=0.1, damping_mode="relative", trace_probes=256), conv_task
    )
    H = dense_ggn(model, conv_task, params, seed=0)
    exact = 0.1 * torch.trace(H).item() / H.shape[0]
    # Hutchinson with 256 Rademacher probes: a few percent
    assert curv.damping == pytest.approx(exact, rel=0.15)


def test_cg_warns_when_not_converged(conv_task):
    _, _, curv = fit(GGNCGHessian(damping=1e-6, rtol=1e-14, maxiter=2), conv_task)
    G = torch.ones(1, curv.n_params, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="did not reach rtol"):
        curv.solve(G)
