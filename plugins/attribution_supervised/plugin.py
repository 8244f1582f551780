"""Registers the supervised tasks and measurements."""

from __future__ import annotations

from attribution_core import Component, hookimpl
from attribution_supervised.digits_classifier import DigitsClassifierOptions, DigitsClassifierTask
from attribution_supervised.linear_regression import LinearRegressionOptions, LinearRegressionTask
from attribution_supervised.measurements import (
    NoOptions,
    cross_entropy_factory,
    margin_factory,
    mse_factory,
)


@hookimpl
def attribution_register_components() -> list[Component]:
    """Tasks linear-regression, digits-classifier; measurements mse, cross-entropy, margin."""
    return [
        Component(
            "task",
            "linear-regression",
            LinearRegressionTask,
            "Ridge regression, closed-form training (synthetic or .npz).",
            LinearRegressionOptions,
        ),
        Component(
            "task",
            "digits-classifier",
            DigitsClassifierTask,
            "MLP on scikit-learn's bundled 8x8 digits, Adam.",
            DigitsClassifierOptions,
        ),
        Component(
            "measurement", "mse", mse_factory, "Squared error (y − f(x))² (regression).", NoOptions
        ),
        Component(
            "measurement",
            "cross-entropy",
            cross_entropy_factory,
            "−log p(y|x) (classification).",
            NoOptions,
        ),
        Component(
            "measurement",
            "margin",
            margin_factory,
            "Negated logit margin (classification).",
            NoOptions,
        ),
    ]
