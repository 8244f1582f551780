"""Acceptance 1: with an orthogonal Φ and proj_dim = n_params, ``trak`` equals dense
empirical-Fisher influence computed independently here (float64, 1e-8 relative)."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn
from trak_helpers import (
    dense_fisher_influence,
    linear_gradients,
    loop_gradients,
    lr_config,
    rel_err,
)

from attribution_core import attribute

# Tolerance: float64 throughout; the pipeline solves (ΦᵀFΦ + λI)⁻¹ by Cholesky in a rotated
# basis while the reference uses numpy's LU in the original one — both backward-stable, so they
# agree to ~cond(F + λI)·1e-16 ≲ 1e-10 at these dampings; 1e-8 relative leaves a safety margin.
RTOL = 1e-8


@pytest.mark.parametrize(
    "damping, mode", [(1e-3, "absolute"), (0.5, "absolute"), (0.1, "relative")]
)
def test_trak_equals_dense_fisher_influence_linear(damping, mode):
    method = {
        "name": "trak",
        "proj_dim": 5,
        "projection": "orthogonal",
        "damping": damping,
        "damping_mode": mode,
    }
    res = attribute(lr_config([method]))
    G = linear_gradients(res.task, res.model, res.task.train_data())
    Gq = linear_gradients(res.task, res.model, res.queries)
    F = G.T @ G / G.shape[0]
    lam = damping * np.trace(F) / F.shape[0] if mode == "relative" else damping
    ref = dense_fisher_influence(G, Gq, lam)
    assert res.scores["trak"].shape == (30, 3)
    assert rel_err(res.scores["trak"], ref) < RTOL
    assert res.manifests["trak"]["info"]["curvature"]["damping"] == pytest.approx(lam, rel=1e-12)


def test_trak_equals_dense_fisher_influence_mlp():
    """Nonlinear model (tanh MLP, cross-entropy), p = 203, gradients by an autograd loop."""
    cfg = {
        "task": {
            "name": "digits-classifier",
            "classes": [0, 1],
            "n_train": 40,
            "hidden": 3,
            "steps": 30,
        },
        "queries": {"source": "generated", "count": 4},
        "target": "cross-entropy",
        "dtype": "float64",
        "methods": [
            {
                "name": "trak",
                "proj_dim": 203,
                "projection": "orthogonal",
                "damping": 1e-2,
                "damping_mode": "absolute",
            }
        ],
    }
    res = attribute(cfg)
    assert res.manifests["trak"]["info"]["parameters"]["n_params"] == 203
    ce = nn.functional.cross_entropy
    data = res.task.train_data()
    G = loop_gradients(res.model, ce, data["x"], data["y"])
    Gq = loop_gradients(res.model, ce, res.queries["x"], res.queries["y"])
    ref = dense_fisher_influence(G, Gq, 1e-2)
    assert rel_err(res.scores["trak"], ref) < RTOL


def test_projection_changes_scores_but_keeps_them_close_at_large_k():
    """Sanity of the approximation: a Gaussian Φ with k ≫ p approaches the exact scores."""
    exact = {
        "name": "trak",
        "label": "exact",
        "proj_dim": 5,
        "projection": "orthogonal",
        "damping": 0.1,
        "damping_mode": "absolute",
    }
    jl = {
        "name": "trak",
        "label": "jl",
        "proj_dim": 4000,
        "damping": 0.1,
        "damping_mode": "absolute",
    }
    res = attribute(lr_config([exact, jl]))
    a, b = res.scores["exact"], res.scores["jl"]
    assert not np.array_equal(a, b)
    # ΦΦᵀ = I + O(√(p/k)) ≈ I ± 0.035 here; the scores follow to a few percent.
    assert rel_err(b, a) < 0.15
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert corr > 0.99
