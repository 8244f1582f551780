"""Registers the ``clip`` and ``pixel-similarity`` scorers and methods."""

from __future__ import annotations

from attribution_clip.scorers import ClipOptions, ClipScorer, NoOptions, PixelSimilarityScorer
from attribution_core import Component, MethodPreset, hookimpl


@hookimpl
def attribution_register_components() -> list[Component]:
    """Scorers and methods ``clip`` and ``pixel-similarity``."""
    return [
        Component(
            "scorer",
            "clip",
            ClipScorer,
            "Cosine of open_clip image embeddings (local weights only).",
            ClipOptions,
        ),
        Component(
            "scorer",
            "pixel-similarity",
            PixelSimilarityScorer,
            "Cosine of raw pixels (weight-free baseline).",
            NoOptions,
        ),
        Component(
            "method",
            "clip",
            MethodPreset(
                "clip", "clip", help="CLIP image-embedding cosine similarity (paper's baseline)."
            ),
            "CLIP image-embedding cosine similarity, ViT-B-32 by default (paper's baseline).",
        ),
        Component(
            "method",
            "pixel-similarity",
            MethodPreset(
                "pixel-similarity", "pixel-similarity", help="Pixel-space cosine similarity."
            ),
            "Pixel-space cosine similarity: weight-free baseline, not CLIP.",
        ),
    ]
