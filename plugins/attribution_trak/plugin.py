"""Registers compressor ``projection``, Hessian ``projected-fisher``, methods trak, d-trak."""

from __future__ import annotations

from attribution_core import Component, MethodPreset, hookimpl
from attribution_trak.fisher import ProjectedFisher, ProjectedFisherOptions
from attribution_trak.projection import ProjectionCompressor, ProjectionOptions

TRAK = MethodPreset(
    "trak",
    scorer="influence",
    hessian="projected-fisher",
    compressor="projection",
    train_function="loss",
    query_function=None,
    help="TRAK: projected empirical Fisher (GGN^loss), loss / target.",
)
D_TRAK = MethodPreset(
    "d-trak",
    scorer="influence",
    hessian="projected-fisher",
    compressor="projection",
    train_function="square-norm",
    query_function="square-norm",
    help="D-TRAK: TRAK with ‖ε_θ‖² as train and query function (l1-norm, l2-norm selectable).",
)
TRAK_ENSEMBLE = MethodPreset(
    "trak-ensemble",
    scorer="influence",
    hessian="projected-fisher",
    compressor="projection",
    train_function="loss",
    query_function=None,
    ensemble={"models": 3},
    help="TRAK averaged over `ensemble.models` independently trained models and projections "
    "(trains M−1; cached).",
)


@hookimpl
def attribution_register_components() -> list[Component]:
    """Compressor projection, hessian projected-fisher, methods trak, trak-ensemble, d-trak."""
    return [
        Component(
            "compressor",
            "projection",
            ProjectionCompressor,
            "Seeded JL projection: N(0,1/k) or ±1/√k entries (torch blocks or traker).",
            ProjectionOptions,
        ),
        Component(
            "hessian",
            "projected-fisher",
            ProjectedFisher,
            "TRAK's empirical Fisher (1/N)Σ(Φg)(Φg)ᵀ + λI in the projected space.",
            ProjectedFisherOptions,
        ),
        Component("method", "trak", TRAK, TRAK.help),
        Component("method", "trak-ensemble", TRAK_ENSEMBLE, TRAK_ENSEMBLE.help),
        Component("method", "d-trak", D_TRAK, D_TRAK.help),
    ]
