"""Builtin components, registered through the same hook and entry point as any plugin."""

from __future__ import annotations

from attribution_core.builtin.compressors import Int8Compression, NoCompression
from attribution_core.builtin.executors import (
    LocalExecutor,
    LocalOptions,
    RayExecutor,
    RayOptions,
)
from attribution_core.builtin.hessians import (
    DenseHessian,
    DenseOptions,
    IdentityHessian,
    IdentityOptions,
)
from attribution_core.builtin.measurements import TrainingLoss, TrainingLossOptions
from attribution_core.builtin.scorers import (
    GradientSimilarityScorer,
    InfluenceOptions,
    InfluenceScorer,
    SimilarityOptions,
)
from attribution_core.hookspecs import hookimpl
from attribution_core.methods import MethodPreset
from attribution_core.registry import Component


def _curvature_and_compression() -> list[Component]:
    """Hessians (identity, dense) and compressors (none, int8)."""
    return [
        Component(
            "hessian",
            "identity",
            IdentityHessian,
            "H = I (gradient dot products).",
            IdentityOptions,
        ),
        Component(
            "hessian",
            "dense",
            DenseHessian,
            "Exact dense Hessian or GGN of L_D (tiny models, float64 solve).",
            DenseOptions,
        ),
        Component("compressor", "none", NoCompression, "No compression."),
        Component(
            "compressor",
            "int8",
            Int8Compression,
            "Symmetric absmax int8 per (row, parameter tensor), dequantised.",
        ),
    ]


def _scoring() -> list[Component]:
    """Scorers (influence, gradient similarity) and the training-loss measurement."""
    return [
        Component(
            "scorer",
            "influence",
            InfluenceScorer,
            "g_qᵀ (H + λI)⁻¹ g_j, composed with a compressor.",
            InfluenceOptions,
        ),
        Component(
            "scorer",
            "gradient-similarity",
            GradientSimilarityScorer,
            "Cosine of (compressed) gradients.",
            SimilarityOptions,
        ),
        Component(
            "measurement",
            "loss",
            TrainingLoss,
            "The task's training loss ℓ(θ, x) (target and default train_function).",
            TrainingLossOptions,
        ),
    ]


def _executors() -> list[Component]:
    """Where jobs run: in this process, or as Ray tasks."""
    return [
        Component(
            "executor",
            "local",
            LocalExecutor,
            "Run jobs sequentially in this process.",
            LocalOptions,
        ),
        Component(
            "executor",
            "ray",
            RayExecutor,
            "Run jobs as Ray tasks (local instance or cluster address).",
            RayOptions,
        ),
    ]


def _method_presets() -> list[Component]:
    """Method presets built from the components above."""
    return [
        Component(
            "method",
            "grad-dot",
            MethodPreset(
                "grad-dot",
                "influence",
                "identity",
                "none",
                help="Gradient dot product (identity Hessian).",
            ),
            "Gradient dot product g_qᵀ g_j (identity Hessian).",
        ),
        Component(
            "method",
            "grad-cosine",
            MethodPreset("grad-cosine", "gradient-similarity", help="Gradient cosine."),
            "Cosine similarity of loss gradients.",
        ),
        Component(
            "method",
            "dense-influence",
            MethodPreset("dense-influence", "influence", "dense", "none", help="Exact influence."),
            "Reference: exact dense Hessian/GGN influence (tiny models).",
        ),
    ]


@hookimpl
def attribution_register_components() -> list[Component]:
    """Identity/dense Hessians, none/int8 compressors, influence/similarity scorers, presets."""
    return [*_curvature_and_compression(), *_scoring(), *_executors(), *_method_presets()]
