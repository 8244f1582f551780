"""Registers the ``kfac``, ``ekfac`` and ``ggn-cg`` Hessians and their influence presets."""

from __future__ import annotations

from attribution_core import Component, MethodPreset, hookimpl
from attribution_kfac.ggn_cg import GGNCGHessian
from attribution_kfac.kfac import EKFACHessian, KFACHessian
from attribution_kfac.options import EKFACOptions, GGNCGOptions, KFACOptions

_PRESET_DEFAULTS = {"fisher": "mc", "approx": "expand", "damping": 1e-8}


@hookimpl
def attribution_register_components() -> list[Component]:
    """Hessians kfac, ekfac, ggn-cg; methods kfac-influence, ekfac-influence, ggn-cg-influence."""
    return [
        Component(
            "hessian",
            "kfac",
            KFACHessian,
            "K-FAC of the GGN of L_D (mc/empirical/type-2/forward-only Fisher; hook back-end "
            "or curvlinops), exact damping.",
            KFACOptions,
        ),
        Component(
            "hessian",
            "ekfac",
            EKFACHessian,
            "EK-FAC: K-FAC eigenbasis with corrected eigenvalues (hooks or curvlinops), exact "
            "damping.",
            EKFACOptions,
        ),
        Component(
            "hessian",
            "ggn-cg",
            GGNCGHessian,
            "Exact damped GGN of L_D solved by conjugate gradients (curvlinops GGN operator).",
            GGNCGOptions,
        ),
        Component(
            "method",
            "kfac-influence",
            MethodPreset(
                "kfac-influence",
                "influence",
                "kfac",
                "int8",
                defaults=dict(_PRESET_DEFAULTS),
                help="K-FAC influence (paper's method): MC-Fisher, expand, int8 queries.",
            ),
            "K-FAC influence: MC-Fisher GGN^model, K-FAC-expand, int8-compressed queries.",
        ),
        Component(
            "method",
            "ekfac-influence",
            MethodPreset(
                "ekfac-influence",
                "influence",
                "ekfac",
                "int8",
                defaults=dict(_PRESET_DEFAULTS),
                help="EK-FAC influence: MC-Fisher, expand, int8 queries.",
            ),
            "EK-FAC influence: MC-Fisher GGN^model, K-FAC-expand basis, int8-compressed queries.",
        ),
        Component(
            "method",
            "ggn-cg-influence",
            MethodPreset(
                "ggn-cg-influence",
                "influence",
                "ggn-cg",
                "none",
                help="Reference: exact damped GGN by conjugate gradients.",
            ),
            "Reference: exact damped GGN influence by conjugate gradients (small models).",
        ),
    ]
