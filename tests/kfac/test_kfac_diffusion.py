"""K-FAC on the DDPM task (dict inputs, Conv2d + attention Linear layers, GroupNorm excluded).

Acceptance 2 (int8 query compression changes rankings little, Spearman ≥ 0.99 vs uncompressed at
the default damping) runs end to end through ``attribute()``; it trains a digits DDPM, so it is
marked slow.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from attribution_kfac.kfac import EKFACHessian, KFACHessian
from scipy.stats import spearmanr

from attribution_core import Component, MethodPreset, attribute, get_registry, hookimpl
from attribution_core.gradients import gradient_chunks, select_parameters, stack_gradients
from attribution_core.interfaces import FitInputs


@pytest.fixture(scope="module")
def reg():
    registry = get_registry()
    if "ddpm-digits" not in registry.names("task"):
        pytest.skip("the diffusion plugin (task ddpm-digits) is not installed")
    return registry


@pytest.fixture(scope="module")
def tiny_ddpm(reg):
    """16 digits, a width-8 U-Net, 30 Adam steps (curvature is tested at any θ)."""
    torch.manual_seed(0)
    task = reg.create("task", "ddpm-digits", n_train=16, width=8, train_steps=30, n_samples=2, T=50)
    model = task.base_model(0)
    return task, model


@pytest.mark.parametrize("cls", [KFACHessian, EKFACHessian])
def test_unet_fit_and_solve(tiny_ddpm, cls, tmp_path):
    task, model = tiny_ddpm
    params, excluded = select_parameters(model)
    fn = task.training_loss(2)
    inputs = FitInputs(
        model=model, task=task, train_function=fn, seed=0, params=params, cache_dir=str(tmp_path)
    )
    curv = cls(damping=1e-4).fit(inputs)
    info = curv.describe()
    assert info["n_samples"] == 2  # default: as many draws as the train_function
    assert info["scale"] == pytest.approx(1 / (16 * 2))
    assert {n.removeprefix("unet.") for n in info["excluded"]} == set(excluded)
    assert any("norm" in n for n in excluded)
    G = stack_gradients(gradient_chunks(model, fn, task.train_data(), params, seed=0))
    X = curv.solve(G[:3])
    assert X.shape == G[:3].shape and bool(torch.isfinite(X).all())
    # (H + λI) X = G, checked with the dense K-FAC? too big: check gᵀ(H+λI)⁻¹g > 0 instead
    assert bool(((X * G[:3]).sum(1) > 0).all())
    # a second fit reads the cache
    again = cls(damping=1e-4).fit(inputs)
    assert again.describe()["from_cache"]
    assert torch.equal(again.solve(G[:3]), X)


def _uncompressed_presets():
    plugin = types.ModuleType("kfac_test_presets")

    @hookimpl
    def attribution_register_components():
        return [
            Component(
                "method",
                "kfac-influence-fp32",
                MethodPreset(
                    "kfac-influence-fp32",
                    "influence",
                    "kfac",
                    "none",
                    defaults={"fisher": "mc", "approx": "expand", "damping": 1e-8},
                ),
                "test",
            )
        ]

    plugin.attribution_register_components = attribution_register_components
    return plugin


@pytest.mark.slow
def test_int8_query_compression_keeps_rankings(reg, tmp_path):
    """Acceptance 2: kfac-influence (int8 queries) vs the same without compression."""
    registry = get_registry([_uncompressed_presets()])
    cfg = {
        "task": {"name": "ddpm-digits"},  # the defaults: classes {0, 1}, all 360, n_samples 8
        "queries": {"count": 4, "seed": 0},
        "methods": ["kfac-influence", "kfac-influence-fp32"],
        "cache_dir": str(tmp_path / "cache"),
        "threads": 1,
    }
    res = attribute(cfg, registry=registry)
    a, b = res.scores["kfac-influence"], res.scores["kfac-influence-fp32"]
    rho = [spearmanr(a[:, q], b[:, q])[0] for q in range(a.shape[1])]
    print("int8 vs fp32 Spearman per query:", np.round(rho, 4))
    assert min(rho) >= 0.99, rho
