"""Fixtures of the exact-retraining tests."""

from __future__ import annotations

import pytest
from retrain_helpers import CountingLinearRegression


@pytest.fixture
def counting_task():
    """A fresh 12-example ridge problem whose trainings are counted."""
    CountingLinearRegression.train_calls = 0
    return CountingLinearRegression(n_train=12, dim=3, noise=0.3, ridge=0.05, data_seed=4)
