"""Registers the ``lissa`` and ``arnoldi`` Hessians and the presets that use them."""

from __future__ import annotations

from attribution_core import Component, MethodPreset, hookimpl
from attribution_influence.arnoldi import ArnoldiHessian, ArnoldiOptions
from attribution_influence.lissa import LiSSAHessian, LiSSAOptions


@hookimpl
def attribution_register_components() -> list[Component]:
    """Hessians lissa, arnoldi; methods lissa-influence, arnoldi-influence (no compression)."""
    return [
        Component(
            "hessian",
            "lissa",
            LiSSAHessian,
            "LiSSA: stochastic Neumann series for (H + λI)⁻¹ on minibatch GGN-vector products "
            "(Agarwal et al. 2017).",
            LiSSAOptions,
        ),
        Component(
            "hessian",
            "arnoldi",
            ArnoldiHessian,
            "Top-r eigenspace of the GGN by Arnoldi (float64, full reorthogonalisation); "
            "influence in that subspace (Schioppa et al. 2022).",
            ArnoldiOptions,
        ),
        Component(
            "method",
            "lissa-influence",
            MethodPreset(
                "lissa-influence",
                "influence",
                "lissa",
                "none",
                help="LiSSA influence (Koh & Liang 2017): stochastic inverse-GGN products.",
            ),
            "LiSSA influence: stochastic Neumann-series inverse-GGN-vector products, "
            "uncompressed queries.",
        ),
        Component(
            "method",
            "arnoldi-influence",
            MethodPreset(
                "arnoldi-influence",
                "influence",
                "arnoldi",
                "none",
                help="Arnoldi influence (Schioppa et al. 2022): top-r GGN eigenspace.",
            ),
            "Arnoldi influence: GGN restricted to its top-r eigenspace, uncompressed queries.",
        ),
    ]
