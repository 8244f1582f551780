"""Methods composed in the config, checked against mathematics (issue 16, acceptance 2 and 5).

The reference is the closed-form influence of ridge regression with one Linear layer:
``L(θ) = (1/N) Σ_j (y_j − θᵀx̃_j)² + λ‖θ‖²``, ``H = (2/N) X̃ᵀX̃ + 2λI``, computed here from the
data in float64, independently of the library. K-FAC with the type-2 Fisher of one Linear layer
with a scalar output and a joint weight+bias block *is* this GGN (one Kronecker factor is 1×1),
so agreement is limited by float64 round-off on a problem with cond(H) ~ 10: 1e-10 relative
leaves a margin of ~10⁴. A square orthogonal projection Φ (k = p) has ΦΦᵀ = I, so
``(Φᵀ H⁻¹ g_q)ᵀ (Φᵀ g_j) = g_qᵀ H⁻¹ g_j`` to the same round-off. All comparisons use the
in-memory float64 scores of the Python API (``scores.npy`` is float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution_core import attribute
from attribution_core.testing import allclose_report, run_attribute

N, D, RIDGE, DAMPING = 80, 5, 0.05, 1e-8
P = D + 1  # weight and bias of the one Linear layer
TASK = {"name": "linear-regression", "n_train": N, "dim": D, "ridge": RIDGE}


def config(*methods, **extra):
    return {
        "task": TASK,
        "queries": {"count": 5, "seed": 3},
        "dtype": "float64",
        "target": "mse",
        "methods": list(methods),
        **extra,
    }


def closed_form_influence(result) -> np.ndarray:
    """``g_jᵀ (H + λI)⁻¹ g_q`` for every (j, q), from the data and the trained θ, float64."""
    data, queries, model = result.task.train_data(), result.queries, result.model
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])

    def grads(x, y):  # ∇_θ (y − θᵀx̃)² = −2 (y − θᵀx̃) x̃
        xt = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        return -2.0 * (y - xt @ theta)[:, None] * xt, xt

    G, Xt = grads(data["x"], data["y"])
    Gq, _ = grads(queries["x"], queries["y"])
    H = 2.0 / N * Xt.T @ Xt + (2 * RIDGE + DAMPING) * torch.eye(P, dtype=torch.float64)
    return (G @ torch.linalg.solve(H, Gq.T)).numpy()


KFAC_EXACT = {"fisher": "type-2", "separate_weight_and_bias": False, "damping": DAMPING}


def test_kfac_influence_without_compression_equals_closed_form():
    entry = {"name": "kfac-influence", **KFAC_EXACT, "compressor": "none"}
    result = attribute(config(entry))
    got = result.scores["kfac-influence"]
    assert got.dtype == np.float64
    assert (
        allclose_report(got, closed_form_influence(result), rtol=0, atol=1e-10 * np.abs(got).max())
        == ""
    )


def test_trak_with_kfac_hessian_and_square_orthogonal_projection_equals_closed_form():
    entry = {
        "name": "trak",
        "hessian": {"name": "kfac", **KFAC_EXACT},
        "projection": "orthogonal",
        "proj_dim": P,
    }
    result = attribute(config(entry))
    got = result.scores["trak"]
    manifest = result.manifests["trak"]["identity"]["method"]
    assert manifest["hessian"]["name"] == "kfac" and manifest["compressor"]["name"] == "projection"
    assert (
        allclose_report(got, closed_form_influence(result), rtol=0, atol=1e-10 * np.abs(got).max())
        == ""
    )


def test_components_named_directly_equal_the_preset_bit_for_bit():
    direct = {"label": "direct", "scorer": "influence", "hessian": "dense", "compressor": "none"}
    result = attribute(config("dense-influence", direct))
    assert np.array_equal(result.scores["direct"], result.scores["dense-influence"])


@pytest.mark.parametrize("name", ["grad-dot", "dense-influence"])
def test_ensemble_of_one_equals_the_plain_method_bit_for_bit(name):
    one = {"name": name, "label": "one", "ensemble": {"models": 1}}
    result = attribute(config(name, one))
    assert np.array_equal(result.scores["one"], result.scores[name])


def classifier(*methods, seed=4):
    """A tiny digits classifier (trained by Adam from ``seed``: the members really differ)."""
    return {
        "task": {"name": "digits-classifier", "n_train": 60, "hidden": 4, "steps": 20},
        "queries": {"source": "train", "count": 3},
        "dtype": "float64",
        "target": "cross-entropy",
        "methods": list(methods),
        "seed": seed,
        "model": {"seed": seed},
    }


def test_ensemble_of_two_equals_the_mean_of_two_separate_runs():
    """Member m: model trained from seed s + m, method seed s + m (s = 4 here)."""
    ens = attribute(classifier({"name": "grad-dot", "ensemble": {"models": 2}}))
    a = attribute(classifier("grad-dot", seed=4)).scores["grad-dot"]
    b = attribute(classifier("grad-dot", seed=5)).scores["grad-dot"]
    assert not np.allclose(a, b)  # the members differ, so the mean is a real check
    assert np.array_equal(ens.scores["grad-dot"], (a + b) / 2)
    members = ens.manifests["grad-dot"]["info"]["ensemble"]["members"]
    assert [m["seed"] for m in members] == [4, 5]


def test_ensemble_members_are_trained_once_and_cached(tmp_path):
    cfg = {
        **classifier({"name": "grad-dot", "ensemble": {"models": 2}}),
        "cache_dir": str(tmp_path),
    }
    first = attribute(cfg).scores["grad-dot"]
    assert len(list((tmp_path / "models").glob("*.safetensors"))) == 2  # base model + member 1
    again = attribute(cfg)
    assert np.array_equal(again.scores["grad-dot"], first)


def test_overriding_a_component_drops_its_preset_defaults():
    """kfac-influence's preset defaults (fisher mc, damping 1e-8) do not follow a new hessian."""
    result = attribute(config({"name": "kfac-influence", "hessian": {"name": "dense"}}))
    hessian = result.manifests["kfac-influence"]["identity"]["method"]["hessian"]
    assert hessian["name"] == "dense" and hessian["damping"] == 0.0


BAD = [
    ({"name": "trak", "compressor": "int8"}, "cannot feed the compressed-space hessian"),
    ({"name": "grad-cosine", "hessian": "kfac"}, "scorer 'gradient-similarity' takes no hessian"),
    ({"name": "exact-retraining", "compressor": "projection"}, "takes no compressor"),
    ({"name": "exact-retraining", "ensemble": {"models": 2}}, "is not gradient-based"),
    ({"name": "trak", "max_memory_mb": 100}, "ambiguous option"),
    ({"name": "trak", "hessian": "kfca"}, "unknown hessian 'kfca'"),
    ({"label": "x", "hessian": "kfac"}, "needs `name`"),
    ({"scorer": "influence", "hessian": "kfac"}, "needs a `label`"),
    ({"name": "grad-dot", "ensemble": {"models": 0}}, "models"),
]


@pytest.mark.parametrize(("entry", "message"), BAD, ids=[m for _, m in BAD])
def test_invalid_composition_exits_2_before_work_naming_the_choices(tmp_path, entry, message):
    code, output = run_attribute(config(entry), tmp_path / "out")
    assert code == 2, output
    assert message in output
    assert not (tmp_path / "out").exists()  # refused before any work
    if "combinations" in output:
        assert "projected-fisher" in output and "int8" in output


def test_compressed_space_hessian_without_compression_is_the_dense_empirical_fisher():
    """``{name: trak, compressor: none}``: F = (1/N) Σ g_j g_jᵀ in parameter space."""
    entry = {"name": "trak", "compressor": "none", "damping": 1e-3, "damping_mode": "absolute"}
    result = attribute(config(entry))
    data, queries, model = result.task.train_data(), result.queries, result.model
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])

    def grads(x, y):
        xt = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        return -2.0 * (y - xt @ theta)[:, None] * xt

    G = grads(data["x"], data["y"])
    Gq = grads(queries["x"], queries["y"])
    F = G.T @ G / N + 1e-3 * torch.eye(P, dtype=torch.float64)
    expected = (G @ torch.linalg.solve(F, Gq.T)).numpy()
    got = result.scores["trak"]
    assert allclose_report(got, expected, rtol=0, atol=1e-10 * np.abs(got).max()) == ""
