"""Influence on ridge regression against closed forms (acceptance: issue 3, point 3).

Objective L(θ) = (1/N) Σ_j (y_j − θᵀx̃_j)² + λ‖θ‖², x̃ = [x, 1], H = (2/N) X̃ᵀX̃ + 2λI.
Everything is float64 and the problem is well conditioned (cond(H) ~ 10), so agreement to
1e-10 relative is the expected round-off level (~1e-14) with ample margin.
"""

from __future__ import annotations

import numpy as np
import torch

from attribution_core import FitInputs, attribute, get_registry
from attribution_core.gradients import example_noise, per_example_gradients, select_parameters

N, D, RIDGE = 200, 10, 0.05
CONFIG = {
    "task": {"name": "linear-regression", "n_train": N, "dim": D, "ridge": RIDGE},
    "queries": {"count": 6, "seed": 3},
    "dtype": "float64",
    "target": "mse",
    "methods": ["dense-influence"],
}


def closed_form(task, model):
    X = task.train_data()["x"].double()
    y = task.train_data()["y"].double()
    Xt = torch.cat([X, torch.ones(N, 1, dtype=X.dtype)], dim=1)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    H = 2.0 / N * Xt.T @ Xt + 2 * RIDGE * torch.eye(D + 1, dtype=X.dtype)
    G = -2.0 * (y - Xt @ theta)[:, None] * Xt  # ∇ℓ_j = −2 r_j x̃_j, (N, D+1)
    return Xt, y, theta, H, G


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_dense_influence_equals_closed_form_scores():
    result = attribute(CONFIG)
    task, model, queries = result.task, result.model, result.queries
    _, _, theta, H, G = closed_form(task, model)
    Xq = torch.cat([queries["x"], torch.ones(queries["x"].shape[0], 1, dtype=torch.float64)], 1)
    Gq = -2.0 * (queries["y"] - Xq @ theta)[:, None] * Xq
    expected = (G @ torch.linalg.solve(H, Gq.T)).numpy()  # (N, Q): g_jᵀ H⁻¹ g_q
    assert result.scores["dense-influence"].shape == (N, 6)
    assert rel_err(result.scores["dense-influence"], expected) < 1e-10


def test_sherman_morrison_leave_one_out_and_pearson(capsys):
    reg = get_registry()
    task = reg.get("task", "linear-regression").factory(
        n_train=N, dim=D, ridge=RIDGE, dtype=torch.float64
    )
    model = task.base_model(0)
    Xt, _, theta, H, G = closed_form(task, model)
    params, _ = select_parameters(model)
    loss = task.training_loss()
    curvature = reg.create("hessian", "dense").fit(FitInputs(model, task, loss, 0, params))
    data = task.train_data()
    G_lib = per_example_gradients(
        model, loss, data, example_noise(loss, data, 0, "train", 0), params
    )
    assert rel_err(G_lib, G) < 1e-12
    d_if = curvature.solve(G_lib) / N  # (N, p): predicted θ_{−j} − θ
    h = 2.0 / N * torch.einsum("jp,pq,jq->j", Xt, torch.linalg.inv(H), Xt)
    d_loo = []
    for j in range(N):
        w = torch.ones(N, dtype=torch.float64)
        w[j] = 0
        m = task.train(task.build_model(0), w, 0)
        d_loo.append(torch.cat([m.weight.detach().reshape(-1), m.bias.detach()]) - theta)
    d_loo = torch.stack(d_loo)
    assert rel_err(d_loo, d_if / (1 - h)[:, None]) < 1e-10

    # predicted vs actual leave-one-out change of each query's squared error
    queries = task.make_queries(model, 6, seed=3)
    Xq = torch.cat([queries["x"], torch.ones(6, 1, dtype=torch.float64)], 1)
    err = lambda th: (queries["y"] - Xq @ th) ** 2
    actual = torch.stack([err(theta + d) - err(theta) for d in d_loo])  # (N, Q)
    Gq = -2.0 * (queries["y"] - Xq @ theta)[:, None] * Xq
    predicted = d_if @ Gq.T  # (1/N) g_qᵀ H⁻¹ g_j
    r = [float(np.corrcoef(predicted[:, q], actual[:, q])[0, 1]) for q in range(6)]
    with capsys.disabled():
        print(f"\nPearson(predicted, actual LOO Δ squared error) per query: {np.round(r, 4)}")
    assert min(r) > 0.9
