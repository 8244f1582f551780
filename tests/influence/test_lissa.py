"""``lissa``: the LiSSA recursion is curvlinops' Neumann series and converges to dense influence."""

from __future__ import annotations

import pytest
from attribution_influence.lissa import LiSSAHessian
from conftest import fit, rhs
from curvlinops import GGNLinearOperator, NeumannInverseLinearOperator
from curvlinops._torch_base import PyTorchLinearOperator

from attribution_core import ConfigError, get_registry
from attribution_core.builtin.hessians import DenseHessian
from attribution_core.testing import allclose_report, build_scorer


class ScaledIdentity(PyTorchLinearOperator):
    """``c·I`` on the parameter list of a curvlinops operator (for ``A = s·GGN + λI``)."""

    SELF_ADJOINT = True

    def __init__(self, like: PyTorchLinearOperator, c: float) -> None:
        super().__init__(like._in_shape, like._out_shape)
        self.c, self._like = c, like

    def _matmat(self, X):
        return [self.c * x for x in X]

    @property
    def device(self):
        return self._like.device

    @property
    def dtype(self):
        return self._like.dtype


def test_full_batch_lissa_is_curvlinops_neumann(digits):
    lam, depth, s = 0.05, 40, 1.0
    hess = LiSSAHessian(damping=lam, depth=depth, scale=s, batch_size=None)
    model, params, curv = fit(hess, digits)
    problem = digits.curvature_problem(model, 0, 1)
    ggn = GGNLinearOperator(
        problem.model,
        problem.loss_function,
        list(params.values()),
        problem.batches(0),
        check_deterministic=False,
    )
    A = problem.scale * ggn + ScaledIdentity(ggn, lam + 2 * digits.l2)
    neumann = NeumannInverseLinearOperator(A, num_terms=depth, scale=1.0 / s)
    G = rhs(curv.ggn.n_params)
    want = (neumann @ G.T).T
    # same series, same float64 products summed in another order: round-off only
    report = allclose_report(curv.solve(G), want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
    assert not report, report


def test_converged_lissa_equals_dense_ggn_influence(digits):
    lam = 0.05
    _, _, curv = fit(LiSSAHessian(damping=lam, tol=1e-9, max_depth=5000, batch_size=None), digits)
    _, _, dense = fit(DenseHessian(damping=lam, curvature="ggn"), digits)
    G = rhs(curv.ggn.n_params)
    want = dense.solve(G)
    # truncation factor (1 − λ_tot/s)^(depth+1) ≤ 1e-9 bounds the relative error per eigvector
    assert curv.describe()["truncation_factor"] <= 1e-9
    report = allclose_report(curv.solve(G), want, rtol=0, atol=1e-8 * float(want.abs().max()))
    assert not report, report


def test_stochastic_lissa_approaches_dense_influence(ridge):
    lam = 0.5
    _, _, curv = fit(LiSSAHessian(damping=lam, batch_size=50, repeats=8, tol=1e-3), ridge)
    _, _, dense = fit(DenseHessian(damping=lam, curvature="ggn"), ridge)
    G = rhs(curv.ggn.n_params)
    want, got = dense.solve(G), curv.solve(G)
    # unbiased for the truncated series (truncation ≤ 1e-3); minibatches of 50 of 200 rows,
    # 8 repeats: Monte-Carlo relative error ≈ 0.07 at this seed — allow twice that
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.15, rel
    # one fixed random map: the same minibatches for a row alone and in a block (round-off only)
    report = allclose_report(curv.solve(G[:1]), got[:1], rtol=1e-12, atol=1e-14)
    assert not report, report


def test_diverging_scale_is_refused(ridge):
    _, _, curv = fit(LiSSAHessian(damping=0.1, scale=0.5, depth=200, batch_size=None), ridge)
    with pytest.raises(Exception, match="diverged"):
        curv.solve(rhs(curv.ggn.n_params))


def test_unconverged_depth_warns(ridge):
    with pytest.warns(RuntimeWarning, match="truncation factor"):
        fit(LiSSAHessian(damping=0.0, depth=3), ridge)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dept": 3}, "dept"),
        ({"scale_factor": 0.5}, "scale_factor"),
        ({"depth": "deep"}, "depth"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_option_is_a_config_error(ridge, options, message):
    with pytest.raises(ConfigError, match=message):
        get_registry().create("hessian", "lissa", **options)
    with pytest.raises(ConfigError, match=message):
        build_scorer({"name": "lissa-influence", **options}, ridge)
