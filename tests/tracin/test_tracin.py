"""TracInCP: exact against grad-dot (K = 1) and a closed-form GD trajectory; refusals; e2e."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attribution_core import ConfigError, attribute, per_example_gradients, select_parameters
from attribution_core.testing import allclose_report, linear_module_task, run_attribute

LINEAR_GD = {
    "name": "linear-regression",
    "n_train": 30,
    "dim": 3,
    "solver": "gd",
    "steps": 12,
    "lr": 0.1,
}


def _run(task: dict, methods: list, **extra) -> object:
    config = {
        "task": task,
        "dtype": "float64",
        "queries": {"source": "generated", "count": 3},
        "methods": methods,
        **extra,
    }
    return attribute(config)


@pytest.mark.parametrize(
    ("task", "target", "lr"),
    [
        (LINEAR_GD, "mse", 0.1),
        (
            {"name": "digits-classifier", "n_train": 40, "steps": 6, "hidden": 4},
            "cross-entropy",
            1e-2,
        ),
    ],
)
def test_one_checkpoint_equals_lr_times_grad_dot(task, target, lr):
    res = _run(task, [{"name": "tracin", "every": 1000}, "grad-dot"], target=target)
    assert res.manifests["tracin"]["info"]["checkpoints"]["steps"] == [task["steps"]]
    msg = allclose_report(res.scores["tracin"], lr * res.scores["grad-dot"], rtol=1e-12, atol=1e-14)
    assert not msg, msg


def test_linear_gd_equals_closed_form_trajectory_sum():
    every = 4
    res = _run(LINEAR_GD, [{"name": "tracin", "every": every}], target="mse")
    task = res.task
    X, y = task.train_data()["x"].numpy(), task.train_data()["y"].numpy()
    Xq, yq = res.queries["x"].numpy(), res.queries["y"].numpy()
    n, eta, lam, steps = X.shape[0], LINEAR_GD["lr"], task.l2, LINEAR_GD["steps"]
    Xt = np.c_[X, np.ones(n)]
    Xqt = np.c_[Xq, np.ones(len(yq))]
    init = task.build_model(0)
    theta0 = np.r_[init.weight.detach().numpy().ravel(), init.bias.detach().numpy()]
    # θ_k = θ* + (I − ηH)^k (θ_0 − θ*), H = (2/N) X̃ᵀX̃ + 2λI, θ* the ridge solution
    H = 2.0 / n * Xt.T @ Xt + 2.0 * lam * np.eye(Xt.shape[1])
    theta_star = np.linalg.solve(H, 2.0 / n * Xt.T @ y)
    M = np.eye(Xt.shape[1]) - eta * H
    expected = np.zeros((n, len(yq)))
    for k in range(every, steps + 1, every):
        theta = theta_star + np.linalg.matrix_power(M, k) @ (theta0 - theta_star)
        G = 2.0 * (Xt @ theta - y)[:, None] * Xt  # ∇(y − θᵀx̃)²
        Gq = 2.0 * (Xqt @ theta - yq)[:, None] * Xqt
        expected += eta * G @ Gq.T
    msg = allclose_report(res.scores["tracin"], expected, rtol=1e-10, atol=1e-12)
    assert not msg, msg


def test_adam_preconditioner_matches_manual():
    task = {"name": "digits-classifier", "n_train": 30, "steps": 4, "hidden": 4}
    res = _run(
        task,
        [{"name": "tracin", "every": 1000, "precondition": "adam"}, "grad-dot"],
        target="cross-entropy",
    )
    cks = res.task.checkpoints(0, 1000, optimizer_state=True)
    ck = cks[-1]
    params, _ = select_parameters(res.model)
    P = torch.cat(
        [
            1.0 / ((ck.exp_avg_sq[k] / (1 - ck.betas[1] ** ck.step)).sqrt() + ck.eps).reshape(-1)
            for k in params
        ]
    )
    data = res.task.train_data()
    G = per_example_gradients(res.model, res.task.training_loss(), data, {}, params)
    Gq = per_example_gradients(
        res.model, res.task.training_loss(), res.queries, {}, params
    )  # cross-entropy target = training loss
    expected = ck.lr * (G * P) @ Gq.T
    msg = allclose_report(res.scores["tracin"], expected, rtol=1e-10, atol=1e-14)
    assert not msg, msg


def test_checkpoint_cache_reused(tmp_path):
    methods = [{"name": "tracin", "every": 5}]
    a = _run(LINEAR_GD, methods, target="mse", cache_dir=str(tmp_path / "c"))
    b = _run(LINEAR_GD, methods, target="mse", cache_dir=str(tmp_path / "c"))
    assert not a.manifests["tracin"]["info"]["checkpoints"]["from_cache"]
    assert b.manifests["tracin"]["info"]["checkpoints"]["from_cache"]
    np.testing.assert_array_equal(a.scores["tracin"], b.scores["tracin"])
    assert list((tmp_path / "c" / "checkpoints").glob("*/index.json"))


def test_task_without_hook_is_refused_naming_the_hook():
    task = linear_module_task(20)
    with pytest.raises(ConfigError, match=r"does not implement the Task\.checkpoints hook"):
        attribute({"dtype": "float64", "queries": {"count": 2}, "methods": ["tracin"]}, task=task)


def _cli(tmp_path, task: dict, method, **extra) -> tuple[int, str]:
    config = {
        "task": task,
        "queries": {"source": "generated", "count": 2},
        "methods": [method],
        **extra,
    }
    return run_attribute(config, tmp_path / "out")


def test_cli_exit_2_on_closed_form_solver(tmp_path):
    code, out = _cli(tmp_path, {"name": "linear-regression", "n_train": 20}, "tracin", target="mse")
    assert code == 2, out
    assert "solver" in out


def test_cli_exit_2_when_model_is_not_the_replayed_run(tmp_path):
    code, out = _cli(tmp_path, LINEAR_GD, "tracin", target="mse", model={"seed": 1})
    assert code == 2, out
    assert "not trained by task" in out and "model_seed" in out
    code, out = _cli(
        tmp_path, LINEAR_GD, {"name": "tracin", "model_seed": 1}, target="mse", model={"seed": 1}
    )
    assert code == 0, out


def test_cli_exit_2_adam_on_gd(tmp_path):
    code, out = _cli(tmp_path, LINEAR_GD, {"name": "tracin", "precondition": "adam"}, target="mse")
    assert code == 2, out
    assert "Adam" in out


@pytest.mark.parametrize(
    ("task", "target"),
    [
        ({"name": "ddpm-digits", "classes": [0, 1], "train_steps": 20, "width": 8}, "loss"),
        ({"name": "digits-classifier", "n_train": 60, "steps": 20}, "cross-entropy"),
        (LINEAR_GD, "mse"),
    ],
)
def test_cli_end_to_end(tmp_path, task, target):
    code, out = _cli(tmp_path, task, {"name": "tracin", "every": 10}, target=target)
    assert code == 0, out
    scores = np.load(tmp_path / "out" / "tracin" / "scores.npy")
    manifest = json.loads((tmp_path / "out" / "tracin" / "manifest.json").read_text())
    assert scores.shape == (manifest["identity"]["task"].get("n_train") or scores.shape[0], 2)
    assert np.isfinite(scores).all() and np.abs(scores).sum() > 0
    assert manifest["info"]["checkpoints"]["steps"][-1] == task.get(
        "steps", task.get("train_steps")
    )
