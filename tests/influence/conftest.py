"""Tiny float64 tasks and a fit helper for the ``lissa`` and ``arnoldi`` Hessians."""

from __future__ import annotations

import pytest
import torch

from attribution_core import FitInputs, get_registry, select_parameters


def tiny_task(name: str, **options):
    """A registered task in float64 (``dtype`` is a factory argument, not an option)."""
    return get_registry().get("task", name).factory(dtype=torch.float64, **options)


def fit(hessian, task, seed: int = 0):
    """``(model, params, curvature)``: ``hessian`` fitted at the task's base model (seed 0)."""
    model = task.base_model(0)
    params, _ = select_parameters(model)
    inputs = FitInputs(
        model=model, task=task, train_function=task.training_loss(), seed=seed, params=params
    )
    return model, params, hessian.fit(inputs)


def rhs(p: int, n: int = 4, seed: int = 2) -> torch.Tensor:
    """``(n, p)`` float64 right-hand sides."""
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def ridge():
    """linear-regression (p = 11, distinct GGN eigenvalues in [1.1, 3.0], l2 = 0.01)."""
    return tiny_task("linear-regression")


@pytest.fixture(scope="module")
def digits():
    """digits-classifier, hidden 4, classes 0–2, 100 examples (p = 275, CE, l2 = 1e-3)."""
    return tiny_task("digits-classifier", hidden=4, classes=[0, 1, 2], n_train=100, steps=100)
