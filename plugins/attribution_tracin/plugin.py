"""Registers scorer ``tracin`` and the method preset ``tracin``."""

from __future__ import annotations

from attribution_core import Component, MethodPreset, hookimpl
from attribution_tracin.scorer import TracInOptions, TracInScorer

TRACIN = MethodPreset(
    "tracin",
    scorer="tracin",
    hessian=None,
    compressor=None,
    train_function="loss",
    query_function=None,
    help="TracInCP: Σ_k η_k ∇m(θ_k,x')ᵀ∇ℓ(θ_k,x_j) over replayed training checkpoints.",
)


@hookimpl
def attribution_register_components() -> list[Component]:
    """Scorer tracin, method tracin."""
    return [
        Component(
            "scorer",
            "tracin",
            TracInScorer,
            "TracInCP over the task's replayed training checkpoints (Task.checkpoints hook).",
            TracInOptions,
        ),
        Component("method", "tracin", TRACIN, TRACIN.help),
    ]
