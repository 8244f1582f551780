"""LoGra: hook-level projections equal the explicit Kronecker projection; square orthogonal
projections give the dense empirical-Fisher influence; refusals; end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attribution_logra.hooks import projected_gradients
from attribution_logra.projection import kronecker_matrix, layer_projections, weight_bias_matrix

from attribution_core import (
    attribute,
    example_noise,
    get_registry,
    per_example_gradients,
    select_parameters,
)
from attribution_core.testing import allclose_report, run_attribute


def _task(name: str, **options):
    return get_registry().get("task", name).factory(dtype=torch.float64, **options)


CASES = {
    "digits-mlp": lambda: _task("digits-classifier", n_train=20, hidden=5),
    "linear": lambda: _task("linear-regression", n_train=10, dim=3),
    "ddpm-unet": lambda: _task("ddpm-digits", classes=[0], n_train=4, width=4, T=20),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["gaussian", "orthogonal"])
def test_hooks_equal_explicit_kronecker_projection(case, kind):
    task = CASES[case]()
    model = task.build_model(0)
    params, _ = select_parameters(model)
    layers = layer_projections(model, params, seed=3, proj_dim_in=5, proj_dim_out=3, kind=kind)
    measurement = task.training_loss(n_samples=2) if case == "ddpm-unet" else task.training_loss()
    data = {k: v[:4] for k, v in task.train_data().items()}
    noise = example_noise(measurement, data, 0, "train", 0)
    phi = projected_gradients(model, measurement, data, noise, layers)
    G = per_example_gradients(model, measurement, data, noise, params)
    grads = dict(zip(params, G.split([p.numel() for p in params.values()], dim=1), strict=True))
    expected = []
    for lay in layers:
        prefix = f"{lay.name}." if lay.name else ""
        w = grads[f"{prefix}weight"].reshape(4, *params[f"{prefix}weight"].shape)
        b = grads.get(f"{prefix}bias")
        wb = weight_bias_matrix(w, b)
        expected.append(wb.reshape(4, -1) @ kronecker_matrix(lay).T)
    expected = torch.cat(expected, dim=1)
    assert phi.shape == expected.shape
    assert any(isinstance(lay.module, torch.nn.Conv2d) for lay in layers) == (case == "ddpm-unet")
    scale = expected.abs().max()
    msg = allclose_report(phi / scale, expected / scale, rtol=0, atol=1e-10)
    assert not msg, msg


@pytest.mark.parametrize(
    ("task", "target"),
    [
        ({"name": "linear-regression", "n_train": 25, "dim": 3}, "mse"),
        ({"name": "digits-classifier", "n_train": 30, "hidden": 3, "steps": 10}, "cross-entropy"),
    ],
)
def test_square_orthogonal_equals_dense_fisher_influence(task, target):
    fisher = {"damping": 1e-3, "damping_mode": "absolute"}
    res = attribute(
        {
            "task": task,
            "dtype": "float64",
            "target": target,
            "queries": {"source": "generated", "count": 3},
            "methods": [
                {
                    "name": "logra",
                    "projection": "orthogonal",
                    "proj_dim_in": 1000,
                    "proj_dim_out": 1000,
                    **fisher,
                },
                {"name": "trak", "label": "dense", "compressor": "none", **fisher},
            ],
        }
    )
    info = res.manifests["logra"]["info"]
    assert info["projection"]["proj_dim"] == info["parameters"]["n_params"]
    msg = allclose_report(res.scores["logra"], res.scores["dense"], rtol=1e-10, atol=1e-12)
    assert not msg, msg


def _cli(tmp_path, task: dict, method, **extra) -> tuple[int, str]:
    config = {
        "task": task,
        "queries": {"source": "generated", "count": 2},
        "methods": [method],
        **extra,
    }
    return run_attribute(config, tmp_path / "out")


@pytest.mark.parametrize(
    ("task", "target"),
    [
        ({"name": "ddpm-digits", "classes": [0, 1], "train_steps": 20, "width": 8}, "loss"),
        ({"name": "digits-classifier", "n_train": 60, "steps": 20}, "cross-entropy"),
        ({"name": "linear-regression", "n_train": 30, "dim": 3}, "mse"),
    ],
)
def test_cli_end_to_end(tmp_path, task, target):
    code, out = _cli(tmp_path, task, "logra", target=target)
    assert code == 0, out
    scores = np.load(tmp_path / "out" / "logra" / "scores.npy")
    assert scores.shape[1] == 2 and np.isfinite(scores).all() and np.abs(scores).sum() > 0


def test_cli_exit_2_parameter_space_hessian(tmp_path):
    task = {"name": "linear-regression", "n_train": 20}
    code, out = _cli(tmp_path, task, {"name": "logra", "hessian": "kfac"}, target="mse")
    assert code == 2, out
    assert "never forms" in out
