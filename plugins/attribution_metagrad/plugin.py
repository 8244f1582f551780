"""Registers scorer ``metagradient`` and the method preset ``metagradient``."""

from __future__ import annotations

from attribution_core import Component, MethodPreset, hookimpl
from attribution_metagrad.scorer import MetagradientOptions, MetagradientScorer

METAGRADIENT = MethodPreset(
    "metagradient",
    scorer="metagradient",
    hessian=None,
    compressor=None,
    train_function="loss",
    query_function=None,
    help="−N·∂m(θ_T(w), x')/∂w_j by reverse mode through every training step (single-model).",
)


@hookimpl
def attribution_register_components() -> list[Component]:
    """Scorer metagradient, method metagradient."""
    return [
        Component(
            "scorer",
            "metagradient",
            MetagradientScorer,
            "Exact metagradients through the task's training-step hook (checkpointed replay).",
            MetagradientOptions,
        ),
        Component("method", "metagradient", METAGRADIENT, METAGRADIENT.help),
    ]
