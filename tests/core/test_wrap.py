"""ModuleTask: a user nn.Module + data + loss becomes a Task every method can use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attribution_core import ConfigError, attribute
from attribution_core.wrap import ModuleTask


def make_task(**kw):
    torch.manual_seed(0)
    X = torch.randn(40, 3, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    return ModuleTask(
        model_fn=lambda seed: nn.Linear(3, 1).double(),
        train_data={"x": X, "y": y},
        loss="mse",
        queries={"x": X[:3], "y": y[:3] + 1.0},
        steps=300,
        lr=0.05,
        **kw,
    )


def test_grad_dot_equals_independent_gradients():
    task = make_task()
    res = attribute(
        {"dtype": "float64", "queries": {"count": 3}, "methods": ["grad-dot"]}, task=task
    )
    model = res.model
    X, y = task.train_data()["x"], task.train_data()["y"]
    Xt = torch.cat([X, torch.ones(40, 1, dtype=X.dtype)], 1)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    G = -2 * (y - Xt @ theta)[:, None] * Xt
    Xq = torch.cat([res.queries["x"], torch.ones(3, 1, dtype=X.dtype)], 1)
    Gq = -2 * (res.queries["y"] - Xq @ theta)[:, None] * Xq
    torch.testing.assert_close(
        torch.as_tensor(res.scores["grad-dot"]), G @ Gq.T, rtol=1e-10, atol=1e-12
    )


def test_custom_callable_loss_refuses_curvature_backends():
    task = make_task()
    task2 = ModuleTask(
        model_fn=lambda s: nn.Linear(3, 1).double(),
        train_data=task.train_data(),
        loss=lambda out, y: (out.squeeze(1) - y).abs(),
    )
    with pytest.raises(ConfigError, match="K-FAC/GGN need a built-in loss"):
        task2.curvature_problem(task2.build_model(0), 0, 1)


def test_bad_wrap_inputs():
    with pytest.raises(ConfigError, match="loss 'hinge' is not built in"):
        ModuleTask(
            lambda s: nn.Linear(1, 1), {"x": torch.zeros(2, 1), "y": torch.zeros(2)}, loss="hinge"
        )
    with pytest.raises(ConfigError, match="train_data lacks 'y'"):
        ModuleTask(lambda s: nn.Linear(1, 1), {"x": torch.zeros(2, 1)}, loss="mse")
    with pytest.raises(ConfigError, match="task: required"):
        attribute({"methods": ["grad-dot"]})
