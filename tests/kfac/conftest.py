"""Fixtures: the toy tasks of ``kfac_toys``."""

from __future__ import annotations

import pytest
from kfac_toys import ToyTask, inputs
from torch import nn


@pytest.fixture
def linear_task() -> ToyTask:
    """One ``nn.Linear(5, 3)``, MSE, 40 examples."""
    return ToyTask(lambda: nn.Linear(5, 3), inputs(40, (5,)), l2=0.01)


@pytest.fixture
def deep_linear_task() -> ToyTask:
    """Deep linear net 4 → 5 → 3 → 2 (no activations), MSE."""
    return ToyTask(
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2)),
        inputs(30, (4,)),
        n_out=2,
    )


@pytest.fixture
def mlp_task() -> ToyTask:
    """Tanh MLP 4 → 6 → 3 with cross-entropy."""
    return ToyTask(
        lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)),
        inputs(50, (4,)),
        loss="ce",
    )


@pytest.fixture
def conv_task() -> ToyTask:
    """Conv2d(1, 2, 3) → ReLU → flatten → Linear(18, 2) on 1×5×5 inputs, MSE."""
    return ToyTask(
        lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 2)),
        inputs(24, (1, 5, 5)),
        n_out=2,
    )


@pytest.fixture
def grouped_conv_task() -> ToyTask:
    """Conv2d(2, 4, 3, groups=2) → ReLU → flatten → Linear(36, 2) on 2×5×5 inputs, MSE.

    The hooks back-end does not model grouped convolutions: K-FAC falls back to curvlinops.
    """
    return ToyTask(
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2)
        ),
        inputs(12, (2, 5, 5)),
        n_out=2,
    )
