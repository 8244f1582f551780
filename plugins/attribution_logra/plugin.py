"""Registers scorer ``logra`` and the method preset ``logra``."""

from __future__ import annotations

from attribution_core import Component, MethodPreset, hookimpl
from attribution_logra.scorer import LoGraOptions, LoGraScorer

LOGRA = MethodPreset(
    "logra",
    scorer="logra",
    hessian="projected-fisher",
    compressor=None,
    train_function="loss",
    query_function=None,
    help="LoGra: per-layer (P_out g)(P_in a)ᵀ projections from hooks, projected Fisher.",
)


@hookimpl
def attribution_register_components() -> list[Component]:
    """Scorer logra, method logra."""
    return [
        Component(
            "scorer",
            "logra",
            LoGraScorer,
            "Influence on LoGra's hook-level Kronecker-projected gradients (never forms ∇θ).",
            LoGraOptions,
        ),
        Component("method", "logra", LOGRA, LOGRA.help),
    ]
