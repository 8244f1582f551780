"""Acceptance 1, where theory guarantees exactness (float64).

* One ``nn.Linear``, weight and bias joint: K-FAC type-2 (and EK-FAC) *is* the GGN, scale
  included — checked against a closed form and against ``dense_ggn``; influence scores too.
* Deep linear network, MSE: the output gradients of a deep linear net do not depend on the
  input, so K-FAC type-2 equals the layer-wise (joint) / parameter-wise (separate)
  block-diagonal GGN (the setting curvlinops' own tests establish); EK-FAC likewise.

Tolerance 1e-10 (absolute, entries are O(1)): float64 round-off of eigendecompositions and
products of ≤ 30-dimensional matrices is ~1e-14; 1e-10 leaves margin but catches any error in
scale (factors of 2, 1/N) or layout (weight/bias order), which are O(1).
"""

from __future__ import annotations

import pytest
import torch
from attribution_kfac.kfac import EKFACHessian, KFACHessian
from kfac_toys import fit, method_parts

from attribution_core import ScoringContext
from attribution_core.builtin.compressors import NoCompression
from attribution_core.builtin.hessians import DenseHessian, dense_ggn
from attribution_core.builtin.scorers import InfluenceScorer

TOL = 1e-10
HESSIANS = [KFACHessian, EKFACHessian]


def closed_form_linear_ggn(task, model) -> torch.Tensor:
    """GGN of (1/N) Σ ‖Wx + b − y‖² + l2‖θ‖² for flat θ = [vec_row(W), b]: (2/N) Σ JᵀJ + 2·l2·I."""
    x = task.train_data()["x"]
    n, d = x.shape
    k = model.weight.shape[0]
    J = torch.zeros(n, k, k * d + k, dtype=torch.float64)
    for out in range(k):
        J[:, out, out * d : (out + 1) * d] = x
        J[:, out, k * d + out] = 1.0
    p = k * d + k
    return 2.0 / n * torch.einsum("nkp,nkq->pq", J, J) + 2 * task.l2 * torch.eye(
        p, dtype=torch.float64
    )


def block_diagonal(H: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    out = torch.zeros_like(H)
    a = 0
    for s in sizes:
        out[a : a + s, a : a + s] = H[a : a + s, a : a + s]
        a += s
    return out


def influence_scores(task, model, hessian, queries):
    train_fn = task.training_loss()
    scorer = InfluenceScorer(method_parts(hessian, NoCompression(), train_fn))
    return scorer.scores(task, model, queries, ScoringContext(target=train_fn))


@pytest.mark.parametrize("cls", HESSIANS)
def test_single_linear_joint_type2_is_the_ggn_with_scale(linear_task, cls):
    hess = cls(fisher="type-2", separate_weight_and_bias=False, damping=0.0)
    model, params, curv = fit(hess, linear_task)
    H_closed = closed_form_linear_ggn(linear_task, model)
    H_dense = dense_ggn(model, linear_task, params, seed=0)
    assert torch.allclose(H_dense, H_closed, atol=TOL, rtol=0)  # the reference itself
    p = H_closed.shape[0]
    reg = 2 * linear_task.l2 * torch.eye(p, dtype=torch.float64)
    err = (curv.dense() + reg - H_closed).abs().max().item()
    assert err < TOL, f"{cls.name}: max |H_kfac − GGN| = {err:.2e}"
    # solve: (H + λI)⁻¹ G with λ = 0 (+ 2·l2 from the regulariser)
    G = torch.randn(4, p, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = torch.linalg.solve(H_closed, G.T).T
    assert (curv.solve(G) - want).abs().max().item() < TOL


@pytest.mark.parametrize("cls", HESSIANS)
def test_single_linear_influence_scores_equal_dense(linear_task, cls):
    model = linear_task.build_model(0)
    queries = linear_task.make_queries(model, 5, 0)
    got = influence_scores(
        linear_task,
        model,
        cls(fisher="type-2", separate_weight_and_bias=False, damping=1e-3),
        queries,
    )
    want = influence_scores(
        linear_task, model, DenseHessian(damping=1e-3, curvature="ggn"), queries
    )
    assert got.shape == (40, 5)
    assert (got - want).abs().max().item() < TOL * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("cls", HESSIANS)
@pytest.mark.parametrize("separate", [False, True])
def test_deep_linear_type2_is_block_diagonal_ggn(deep_linear_task, cls, separate):
    # damping only enters solve(); the deep net's first G factor is rank 2 (singular)
    hess = cls(fisher="type-2", separate_weight_and_bias=separate, damping=1e-3)
    model, params, curv = fit(hess, deep_linear_task)
    H = dense_ggn(model, deep_linear_task, params, seed=0)
    sizes = [t.numel() for t in params.values()]
    if not separate:  # one block per layer: [W | b]
        sizes = [a + b for a, b in zip(sizes[::2], sizes[1::2], strict=True)]
    H_bd = block_diagonal(H, sizes)
    err = (curv.dense() - H_bd).abs().max().item()
    assert err < TOL, f"{cls.name} separate={separate}: max |H_kfac − blockdiag GGN| = {err:.2e}"
    # scores: g_jᵀ (H_bd + λI)⁻¹ g_q against the scorer with the same damping
    lam = 1e-3
    model_q = deep_linear_task.make_queries(model, 4, 0)
    got = influence_scores(
        deep_linear_task,
        model,
        cls(fisher="type-2", damping=lam, separate_weight_and_bias=separate),
        model_q,
    )
    from attribution_core.gradients import example_noise, per_example_gradients

    fn = deep_linear_task.training_loss()
    data = deep_linear_task.train_data()
    Gt = per_example_gradients(model, fn, data, example_noise(fn, data, 0, "train", 0), params)
    Gq = per_example_gradients(model, fn, model_q, {}, params)
    want = Gt @ torch.linalg.solve(H_bd + lam * torch.eye(H.shape[0], dtype=H.dtype), Gq.T)
    assert (got - want).abs().max().item() < TOL * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("cls", HESSIANS)
def test_conv_covering_the_input_is_exact(cls):
    """Conv2d whose 3×3 kernel covers the 2×3×3 input (one output position): no weight sharing,
    so K-FAC type-2 with joint weight and bias is the GGN — this pins the (c_in, kh, kw) layout."""
    from kfac_toys import ToyTask, inputs
    from torch import nn

    task = ToyTask(lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()), inputs(20, (2, 3, 3)))
    hess = cls(fisher="type-2", separate_weight_and_bias=False, damping=1e-3)
    model, params, curv = fit(hess, task)
    H = dense_ggn(model, task, params, seed=0)
    err = (curv.dense() - H).abs().max().item()
    assert err < TOL, f"{cls.name}: max |H_kfac − GGN| = {err:.2e}"
