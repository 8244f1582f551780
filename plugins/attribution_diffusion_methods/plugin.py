"""Registers measurements journey-loss, das-output, scorer das, methods journey-trak and das."""

from __future__ import annotations

from attribution_core import Component, MethodPreset, hookimpl
from attribution_diffusion_methods.das import (
    DASOptions,
    DASOutputOptions,
    DASScorer,
    das_output_factory,
)
from attribution_diffusion_methods.journey import JourneyLossOptions, journey_loss_factory

JOURNEY_TRAK = MethodPreset(
    "journey-trak",
    scorer="influence",
    hessian="projected-fisher",
    compressor="projection",
    train_function="loss",
    query_function={"name": "journey-loss"},
    help="journey-TRAK: TRAK with the loss of the x̂₀ predicted at sampling step t (default ⌊T/2⌋) "
    "as query function (diffusion only).",
)
DAS = MethodPreset(
    "das",
    scorer="das",
    compressor="projection",
    train_function="das-output",
    query_function={"name": "das-output", "n_samples": 1},
    help="DAS: linearised ‖Δε_θ‖² on the query after a leverage-corrected leave-one-out Newton "
    "step (diffusion only).",
)


@hookimpl
def attribution_register_components() -> list[Component]:
    """Measurements journey-loss, das-output; scorer das; methods journey-trak, das."""
    return [
        Component(
            "measurement",
            "journey-loss",
            journey_loss_factory,
            "Loss at step t of the x̂₀ predicted along the query's trajectory (journey-TRAK "
            "function, not a target).",
            JourneyLossOptions,
        ),
        Component(
            "measurement",
            "das-output",
            das_output_factory,
            "Rademacher sketch S^{-1/2} Σ vᵀε_θ(x_t, t) with its residual (DAS function, not a "
            "target).",
            DASOutputOptions,
        ),
        Component(
            "scorer",
            "das",
            DASScorer,
            "Diffusion Attribution Score: mean over draws of (ψᵀδ_i)², δ_i the "
            "leverage-corrected leave-one-out step.",
            DASOptions,
        ),
        Component("method", "journey-trak", JOURNEY_TRAK, JOURNEY_TRAK.help),
        Component("method", "das", DAS, DAS.help),
    ]
