"""Similarity scorers: ``clip`` (open_clip image embeddings) and ``pixel-similarity``.

Both return ``scores[j, q] = cos(e(x_j), e(x'_q))`` in [-1, 1], ``(n_train, n_query)``, float64:
positive = similar, read under the library's sign convention as "x_j helped produce x'_q"
(paper, App. J: the CLIP cosine-similarity baseline). Neither depends on the model being
attributed nor on the target; ``predict_subsets`` is the additive default
``(1/N)·(~masks) @ scores``.

* ``clip``: ``e(x) = E(T(x)) / ‖E(T(x))‖`` with ``E`` the open_clip image encoder and ``T``
  open_clip's own eval transform for that model (resize, centre crop, normalise), applied to the
  task's images after grayscale → 3 channels.
* ``pixel-similarity``: ``e(x) = vec(x) / ‖vec(x)‖`` on the task's images in [0, 1] — a weight-free
  baseline, never a stand-in for ``clip``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from torch import Tensor, nn

from attribution_clip.weights import ResolvedWeights, load_model, resolve_weights
from attribution_core import (
    AttributionError,
    Batch,
    ConfigError,
    MethodParts,
    Scorer,
    ScoringContext,
    Task,
)


class ClipOptions(BaseModel):
    """Options of the ``clip`` scorer (checked, offline, before any work starts)."""

    model_config = ConfigDict(extra="forbid")
    architecture: str = Field(
        "ViT-B-32",
        description="open_clip model name, or the path of an open_clip model-config .json.",
    )
    checkpoint: str | None = Field(
        None, description="Local weights file (state dict of the whole open_clip model)."
    )
    pretrained: str | None = Field(
        None,
        description="open_clip pretrained tag already in the local cache (default when no "
        "checkpoint: 'openai'); never downloaded.",
    )
    cache_dir: str | None = Field(
        None, description="Cache to look in for `pretrained` (default: HF cache, ~/.cache/clip)."
    )
    quick_gelu: bool | None = Field(
        None,
        description="QuickGELU activation (default: the tag's setting; False for a checkpoint).",
    )
    batch_size: int = Field(64, ge=1, description="Images per encoder forward pass.")

    @model_validator(mode="after")
    def _weights_exist(self) -> ClipOptions:
        try:
            self.resolve()
        except AttributionError as exc:
            raise PydanticCustomError("clip_weights", "{msg}", {"msg": str(exc)}) from None
        return self

    def resolve(self) -> ResolvedWeights:
        """The local weights file these options name (see :func:`resolve_weights`)."""
        return resolve_weights(
            self.architecture, self.checkpoint, self.pretrained, self.cache_dir, self.quick_gelu
        )


class NoOptions(BaseModel):
    """``pixel-similarity`` has no options."""

    model_config = ConfigDict(extra="forbid")


def task_images(task: Task, batch: Batch, method: str) -> Tensor:
    """``task.images(batch)`` checked: ``(B, C, H, W)`` with C in {1, 3}.

    Raises:
        ConfigError: the task has no images, or not 1/3-channel ones.
    """
    images = task.images(batch)
    if images is None:
        raise ConfigError(
            f"method {method!r}: task {task.name!r} has no images (task.images() returned None); "
            f"similarity baselines need an image task such as digits-classifier or ddpm-digits"
        )
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(
            f"method {method!r}: task {task.name!r} images mismatch: expected (B, 1 or 3, H, W), "
            f"got {tuple(images.shape)}"
        )
    return images


def unit_rows(E: Tensor) -> Tensor:
    """Rows of ``E`` scaled to unit Euclidean norm (float64; all-zero rows stay zero)."""
    E = E.to(torch.float64)
    return E / E.norm(dim=1, keepdim=True).clamp_min(torch.finfo(E.dtype).tiny)


class ClipScorer(Scorer):
    """``cos(CLIP(x_j), CLIP(x'_q))`` with open_clip image embeddings."""

    name = "clip"

    def __init__(self, parts: MethodParts, **options: Any) -> None:
        self.parts = parts
        self.options = ClipOptions(**options)
        self.weights = self.options.resolve()
        self._model: nn.Module | None = None
        self._transform: Any = None

    def model(self, device: torch.device) -> nn.Module:
        """The open_clip model (loaded once, offline) on ``device``."""
        if self._model is None:
            import open_clip
            from open_clip.transform import PreprocessCfg, image_transform_v2

            self._model = load_model(self.weights, device)
            cfg = open_clip.get_model_preprocess_cfg(self._model)
            self._transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
        return self._model.to(device)

    def preprocess(self, images: Tensor) -> Tensor:
        """``(B, 1|3, H, W)`` in [0, 1] → ``(B, 3, S, S)`` by open_clip's eval transform."""
        if self._transform is None:
            self.model(images.device)
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale → RGB, as PIL's convert("RGB")
        return self._transform(x.contiguous())

    @torch.no_grad()
    def embed(self, task: Task, batch: Batch) -> Tensor:
        """``(B, D)`` unit-norm float64 image embeddings of ``batch``'s images."""
        images = task_images(task, batch, self.parts.label)
        model = self.model(images.device)
        out = []
        for start in range(0, images.shape[0], self.options.batch_size):
            x = self.preprocess(images[start : start + self.options.batch_size])
            out.append(model.encode_image(x))
        return unit_rows(torch.cat(out))

    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` cosine similarities in [-1, 1] (float64)."""
        t0 = time.perf_counter()
        Eq = self.embed(task, queries)
        Et = self.embed(task, task.train_data())
        context.timings["embed"] = time.perf_counter() - t0
        import open_clip

        context.info["clip"] = {
            **self.weights.describe(),
            "embedding_dim": int(Eq.shape[1]),
            "preprocess": {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in open_clip.get_model_preprocess_cfg(self._model).items()
            },
        }
        return Et @ Eq.T


class PixelSimilarityScorer(Scorer):
    """``cos(vec(x_j), vec(x'_q))`` in pixel space — weight-free baseline."""

    name = "pixel-similarity"

    def __init__(self, parts: MethodParts, **options: Any) -> None:
        self.parts = parts

    def embed(self, task: Task, batch: Batch) -> Tensor:
        """``(B, C·H·W)`` unit-norm float64 flattened images."""
        images = task_images(task, batch, self.parts.label)
        return unit_rows(images.reshape(images.shape[0], -1))

    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` pixel-space cosine similarities (float64)."""
        context.info["pixel_similarity"] = "cosine of raw task images in [0, 1]; no weights"
        return self.embed(task, task.train_data()) @ self.embed(task, queries).T
