"""Acceptance 1, properties where K-FAC is not exact (float64).

* EK-FAC is at least as close to the dense GGN as K-FAC in Frobenius norm (tiny tanh MLP and a
  conv net): both are block-diagonal in the same eigenbasis, and EK-FAC's eigenvalues are the
  Frobenius-optimal diagonal in that basis.
* The MC-Fisher (std √½ pseudo-targets for the summed squared error, p(y) ∝ exp(−‖y − f‖²)) is
  an unbiased estimate of the type-2 factors: the error shrinks as ``mc_samples`` grows.
* Solve is the inverse of ``dense() + λI``; K-FAC-reduce equals expand without weight sharing.
"""

from __future__ import annotations

import pytest
import torch
from attribution_kfac.kfac import EKFACHessian, KFACHessian
from kfac_toys import fit

from attribution_core.builtin.hessians import dense_ggn


@pytest.mark.parametrize("task_name", ["mlp_task", "conv_task"])
@pytest.mark.parametrize("separate", [False, True])
def test_ekfac_at_least_as_close_as_kfac(request, task_name, separate):
    task = request.getfixturevalue(task_name)
    opts = {"fisher": "type-2", "separate_weight_and_bias": separate, "damping": 1e-3}
    model, params, kfac = fit(KFACHessian(**opts), task)
    _, _, ekfac = fit(EKFACHessian(**opts), task, model=model)
    H = dense_ggn(model, task, params, seed=0)
    err_k = torch.linalg.norm(kfac.dense() - H).item()
    err_e = torch.linalg.norm(ekfac.dense() - H).item()
    # exact inequality; 1e-12 relative slack for float64 round-off
    assert err_e <= err_k * (1 + 1e-12), f"EK-FAC {err_e:.4e} > K-FAC {err_k:.4e}"
    assert err_e < err_k  # strictly better on a non-linear net


@pytest.mark.parametrize("task_name", ["mlp_task", "conv_task"])
def test_mc_fisher_converges_to_type2(request, task_name):
    """Relative Frobenius error of MC K-FAC vs type-2 K-FAC falls ~1/√m (1 → 256 samples)."""
    task = request.getfixturevalue(task_name)
    model, _, exact = fit(KFACHessian(fisher="type-2"), task)
    H2 = exact.dense()
    errors = []
    for m in (1, 16, 256):
        _, _, mc = fit(KFACHessian(fisher="mc", mc_samples=m), task, model=model)
        errors.append((torch.linalg.norm(mc.dense() - H2) / torch.linalg.norm(H2)).item())
    assert errors[0] > errors[1] > errors[2], errors
    # 1/√m predicts a ratio of 16 between m=1 and m=256; require at least 4
    assert errors[2] < errors[0] / 4, errors
    assert errors[2] < 0.1, errors


def test_solve_inverts_damped_dense(conv_task):
    lam = 0.05
    _, _params, curv = fit(KFACHessian(fisher="type-2", damping=lam), conv_task)
    p = curv.n_params
    G = torch.randn(3, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = torch.linalg.solve(curv.dense() + lam * torch.eye(p, dtype=torch.float64), G.T).T
    assert (curv.solve(G) - want).abs().max().item() < 1e-10 * want.abs().max().item()


def test_relative_damping_is_trace_over_p(conv_task):
    _, _, curv = fit(KFACHessian(fisher="type-2", damping=0.1, damping_mode="relative"), conv_task)
    H = curv.dense()
    assert curv.damping == pytest.approx(0.1 * torch.trace(H).item() / H.shape[0], rel=1e-12)


def test_reduce_equals_expand_without_weight_sharing(mlp_task):
    model, _, a = fit(KFACHessian(fisher="type-2", approx="expand"), mlp_task)
    _, _, b = fit(KFACHessian(fisher="type-2", approx="reduce"), mlp_task, model=model)
    assert (a.dense() - b.dense()).abs().max().item() < 1e-12


def test_reduce_differs_from_expand_on_conv(conv_task):
    model, _, a = fit(KFACHessian(fisher="type-2", approx="expand"), conv_task)
    _, _, b = fit(KFACHessian(fisher="type-2", approx="reduce"), conv_task, model=model)
    assert (a.dense() - b.dense()).abs().max().item() > 1e-6


def test_factored_damping_matches_kronecker_formula(linear_task):
    """``(√s·A + √λI) ⊗ (√s·G + √λI)`` inverted, built densely from the same factors."""
    lam = 0.3
    _, _, curv = fit(
        KFACHessian(fisher="type-2", damping=lam, damping_kind="factored"), linear_task
    )
    lam_tot = lam + 2 * linear_task.l2
    block = curv.blocks[0]
    f = curv.factors
    s = curv.scale

    def damped(Q, ev):
        return Q @ torch.diag(s**0.5 * ev + lam_tot**0.5) @ Q.T

    L = block.layer
    Mw = torch.kron(damped(f[f"{L}|QG"], f[f"{L}|lam_g"]), damped(f[f"{L}|QA"], f[f"{L}|lam_a"]))
    Mb = damped(f[f"{L}|QG"], f[f"{L}|lam_g"]) * (s**0.5 + lam_tot**0.5)
    M = torch.block_diag(Mw, Mb)
    G = torch.randn(2, M.shape[0], generator=torch.Generator().manual_seed(1), dtype=M.dtype)
    want = torch.linalg.solve(M, G.T).T
    assert (curv.solve(G) - want).abs().max().item() < 1e-10
