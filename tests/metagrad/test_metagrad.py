"""Metagradient exactness (issue 18, acceptance 1) and refusals (acceptance 5, in part).

* linear-regression (solver: gd): the weight-derivative of the final iterate follows the linear
  recurrence ``D_t = (I − ηH) D_{t−1} − η (2/N) X̃ᵀ diag(r_{t−1})``, computed here in numpy;
* forward mode (``torch.func.jvp`` through the unrolled training) agrees with the reverse-mode
  scores on the digits classifier and a tiny DDPM (float64);
* checkpointed replay equals storing every state, bit for bit;
* central finite differences under SGD agree to 1e-6;
* a task without the hook, a closed-form solver, a model not from the replayed run: exit 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attribution_diffusion import DDPMDigitsTask
from attribution_metagrad.replay import ReplayPlan, weight_gradients
from attribution_metagrad.scorer import query_gradient_fn
from attribution_supervised.digits_classifier import DigitsClassifierTask
from torch.func import functional_call

from attribution_core import (
    ConfigError,
    OptimizerConfig,
    TrainingRecipe,
    attribute,
    example_noise,
    final_parameters,
    initial_training_state,
    train_single_model,
    unroll_training,
)
from attribution_core.testing import (
    LINEAR_GD_TASK,
    TINY_DDPM_OPTIONS,
    allclose_report,
    linear_module_task,
    run_attribute,
)

LINEAR_GD = LINEAR_GD_TASK
TINY_DDPM = TINY_DDPM_OPTIONS


class SGDDigits(DigitsClassifierTask):
    """The digits classifier trained by plain SGD (a smooth recipe, for finite differences)."""

    def training_recipe(self) -> TrainingRecipe:
        base = super().training_recipe()
        return TrainingRecipe(base.steps, base.batch_size, OptimizerConfig("sgd", 0.5))


def _setup(task, measurement, n_query=3, seed=0):
    """``(queries, noise, model, m(w) -> (Q,), ∂m/∂w (N, Q) with plan)``."""
    model = train_single_model(task, torch.ones(task.n_train, dtype=task.dtype), seed)
    queries = task.make_queries(model, n_query, 0)
    noise = example_noise(measurement, queries, 0, "query", 0)
    grads = query_gradient_fn(model, measurement, queries, noise)

    start = initial_training_state(task, seed)  # built outside the jvp transform
    steps = range(1, task.training_recipe().steps + 1)

    def measure(weights):
        params, state = unroll_training(task, *start, weights, seed, steps)
        final = final_parameters(params, state)
        return measurement.evaluate(lambda *a: functional_call(model, final, a), queries, noise)

    def reverse(every, query_batch=2):
        plan = ReplayPlan(task.training_recipe().steps, every, query_batch)
        ones = torch.ones(task.n_train, dtype=task.dtype)
        return weight_gradients(task, seed, ones, grads, n_query, plan)

    return measure, reverse


def test_linear_gd_matches_the_weight_derivative_recurrence():
    res = attribute(
        {
            "task": LINEAR_GD,
            "dtype": "float64",
            "queries": {"source": "generated", "count": 3},
            "target": "mse",
            "methods": [{"name": "metagradient", "checkpoint_every": 4}],
        }
    )
    task = res.task
    X, y = task.train_data()["x"].numpy(), task.train_data()["y"].numpy()
    Xq, yq = res.queries["x"].numpy(), res.queries["y"].numpy()
    n, eta, lam = X.shape[0], task.lr, task.l2
    Xt, Xqt = np.c_[X, np.ones(n)], np.c_[Xq, np.ones(len(yq))]
    init = task.build_model(0)
    theta = np.r_[init.weight.detach().numpy().ravel(), init.bias.detach().numpy()]
    H = 2.0 / n * Xt.T @ Xt + 2.0 * lam * np.eye(Xt.shape[1])
    D = np.zeros((Xt.shape[1], n))  # ∂θ_t/∂w at w = 1
    for _ in range(LINEAR_GD["steps"]):
        r = Xt @ theta - y
        D = (np.eye(Xt.shape[1]) - eta * H) @ D - eta * 2.0 / n * Xt.T * r[None, :]
        theta = theta - eta * (2.0 / n * Xt.T @ r + 2.0 * lam * theta)
    dm = 2.0 * (Xqt @ theta - yq)[:, None] * Xqt  # ∇_θ (y_q − θᵀx̃_q)²
    expected = -n * (dm @ D).T
    scale = np.abs(expected).max()
    msg = allclose_report(res.scores["metagradient"], expected, rtol=0, atol=1e-10 * scale)
    assert not msg, msg


@pytest.mark.parametrize(
    ("name", "make", "measurement"),
    [
        (
            "digits-classifier",
            lambda: DigitsClassifierTask(n_train=30, steps=6, hidden=3, dtype=torch.float64),
            "cross-entropy",
        ),
        (
            "ddpm-digits",
            lambda: DDPMDigitsTask(dtype=torch.float64, batch_size=4, **TINY_DDPM),
            "loss",
        ),
    ],
)
def test_forward_mode_agrees_and_checkpointing_is_bitwise(name, make, measurement):
    task = make()
    m = task.training_loss(n_samples=2) if measurement == "loss" else task.training_loss()
    measure, reverse = _setup(task, m)
    store_all = reverse(every=1)
    checkpointed = reverse(every=2)
    assert torch.equal(store_all, checkpointed), "checkpointed replay differs from store-all"
    gen = torch.Generator().manual_seed(1)
    ones = torch.ones(task.n_train, dtype=task.dtype)
    scale = store_all.abs().max(dim=0).values  # max_j |∂m_q/∂w_j| per query
    assert bool((scale > 0).all())
    for _ in range(2):
        v = torch.randn(task.n_train, generator=gen, dtype=task.dtype)
        _, forward = torch.func.jvp(measure, (ones,), (v,))
        gap = (forward - v @ store_all).abs() / scale
        assert float(gap.max()) < 1e-10, f"{name}: jvp vs reverse mode {gap.tolist()}"


def test_central_differences_agree_under_sgd():
    task = SGDDigits(n_train=30, steps=8, hidden=3, dtype=torch.float64)
    measure, reverse = _setup(task, task.training_loss())
    dm = reverse(every=3)
    h = 1e-4
    scale = float(dm.abs().max())
    for j in (0, 7, 21):
        e = torch.zeros(task.n_train, dtype=task.dtype)
        e[j] = h
        ones = torch.ones(task.n_train, dtype=task.dtype)
        with torch.no_grad():
            fd = (measure(ones + e) - measure(ones - e)) / (2 * h)
        assert float((fd - dm[j]).abs().max()) < 1e-6 * max(scale, 1.0), (j, fd, dm[j])


def test_task_without_hook_is_refused_naming_it():
    task = linear_module_task(20)
    config = {"dtype": "float64", "queries": {"count": 2}, "methods": ["metagradient"]}
    with pytest.raises(ConfigError, match=r"training-step hook \(Task\.training_recipe"):
        attribute(config, task=task)


def _cli(tmp_path, task, method, **extra):
    config = {"task": task, "queries": {"source": "generated", "count": 2}, "methods": [method]}
    return run_attribute({**config, **extra}, tmp_path / "out")


def test_cli_exit_2_closed_form_and_foreign_model(tmp_path):
    closed = {"name": "linear-regression", "n_train": 20}
    code, out = _cli(tmp_path, closed, "metagradient", target="mse")
    assert code == 2 and "solver: gd" in out, out
    code, out = _cli(tmp_path, LINEAR_GD, "metagradient", target="mse", model={"seed": 1})
    assert code == 2 and "model_seed" in out, out
