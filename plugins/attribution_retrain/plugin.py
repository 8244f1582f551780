"""Registers the ``exact-retraining`` scorer and method."""

from __future__ import annotations

from attribution_core import Component, MethodPreset, hookimpl
from attribution_retrain.scorer import ExactRetrainingScorer, RetrainOptions


@hookimpl
def attribution_register_components() -> list[Component]:
    """Scorer and method ``exact-retraining``."""
    return [
        Component(
            "scorer",
            "exact-retraining",
            ExactRetrainingScorer,
            "Leave-one-out retraining N·[m(θ_−j) − m(θ)]; subset oracle for LDS.",
            RetrainOptions,
        ),
        Component(
            "method",
            "exact-retraining",
            MethodPreset("exact-retraining", "exact-retraining", help="Exact retraining (oracle)."),
            "Exact retraining: leave-one-out scores, one retrained model per LDS subset (oracle).",
        ),
    ]
