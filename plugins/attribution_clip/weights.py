"""Offline resolution and loading of open_clip weights (nothing is ever downloaded).

Weights come from exactly one of:

* ``checkpoint``: a local file (``.safetensors``, ``.pt``/``.pth``/``.bin`` state dict) of the
  whole open_clip model of ``architecture`` (what ``model.state_dict()`` returns);
* ``pretrained``: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...) whose file
  is **already** in the local Hugging Face cache or open_clip's URL cache (``~/.cache/clip``);
  with neither set, the tag ``openai`` (the paper's CLIP) is looked for.

``architecture`` is an open_clip model name (``ViT-B-32``) or the path of an open_clip model-config
JSON (``{"embed_dim", "vision_cfg", "text_cfg"}``), registered with ``open_clip.add_model_config``
under its file stem.

Every failure raises :class:`attribution_core.ConfigError` / :class:`attribution_core.DataError`
naming what was looked for and how to provide it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attribution_core import ConfigError, DataError

DEFAULT_TAG = "openai"
"""Tag looked for when neither ``checkpoint`` nor ``pretrained`` is set (the paper's CLIP)."""

_FETCH_HINT = (
    "fetch it once on a machine with network access "
    "(python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\") and "
    "copy the cache here, or set checkpoint: /path/to/weights.safetensors"
)


@dataclass(frozen=True)
class ResolvedWeights:
    """Where the weights come from, resolved to a local file.

    Attributes:
        architecture: the open_clip model name (a config JSON's stem).
        config_path: the model-config JSON registered for it, or None for a built-in name.
        path: local weights file.
        source: ``"checkpoint"`` or ``"pretrained:<tag>"``.
        quick_gelu: activation the weights were trained with.
        preprocess: overrides of the preprocessing config (the tag's mean/std/interpolation).
    """

    architecture: str
    config_path: str | None
    path: str
    source: str
    quick_gelu: bool
    preprocess: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-able record for the manifest."""
        return {
            "architecture": self.architecture,
            "config_path": self.config_path,
            "weights": self.path,
            "source": self.source,
            "quick_gelu": self.quick_gelu,
        }


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` for the duration (then restore)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def register_architecture(architecture: str) -> tuple[str, str | None]:
    """Resolve ``architecture`` to an open_clip model name, registering a config JSON if given.

    Returns:
        ``(name, config_path)``; ``config_path`` is None for built-in names.

    Raises:
        ConfigError: unknown name, unreadable JSON, or a stem that clashes with another config.
    """
    import open_clip

    if architecture.endswith(".json"):
        path = Path(architecture)
        if not path.is_file():
            raise ConfigError(
                f"architecture: model-config file {architecture!r} does not exist; give an "
                f"open_clip model name (e.g. ViT-B-32) or a JSON with embed_dim, vision_cfg, "
                f"text_cfg"
            )
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"architecture: {architecture!r} is not valid JSON: {exc}") from None
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ConfigError(
                f"architecture: {architecture!r} lacks keys {missing}; an open_clip model config "
                f"needs embed_dim, vision_cfg and text_cfg"
            )
        name = path.stem
        known = open_clip.get_model_config(name)
        if known is not None and known != cfg:
            raise ConfigError(
                f"architecture: {architecture!r} registers name {name!r}, which open_clip already "
                f"knows with a different config; rename the file"
            )
        if known is None:
            open_clip.add_model_config(path)
        return name, str(path.resolve())
    if open_clip.get_model_config(architecture) is None:
        raise ConfigError(
            f"architecture: unknown open_clip model {architecture!r}; valid names: "
            f"{', '.join(open_clip.list_models()[:12])}, ... (open_clip.list_models()), or the "
            f"path of a model-config .json"
        )
    return architecture, None


def cached_tag_file(
    architecture: str, tag: str, cache_dir: str | None
) -> tuple[str | None, dict[str, Any], list[str]]:
    """Look up the local file of an open_clip pretrained tag without any network access.

    Returns:
        ``(path or None, tag config, descriptions of every place looked at)``.

    Raises:
        ConfigError: the tag is not an open_clip tag of ``architecture``.
    """
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(architecture, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        raise ConfigError(
            f"pretrained: {tag!r} is not an open_clip tag of {architecture!r}; valid tags: "
            f"{', '.join(tags) if tags else '(none: give checkpoint: /path/to/weights)'}"
        )
    looked: list[str] = []
    if cfg.get("file"):
        looked.append(cfg["file"])
        if Path(cfg["file"]).is_file():
            return cfg["file"], cfg, looked
    if cfg.get("hf_hub"):
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" -> ("org/repo", "")
        filename = filename or HF_WEIGHTS_NAME
        names = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
        if filename.endswith((".bin", ".pth")):
            names.append(filename[:-4] + ".safetensors")
        names.append(filename)
        hub_cache = cache_dir or constants.HF_HUB_CACHE
        for name in names:
            looked.append(f"hf-hub {repo}/{name} in {hub_cache}")
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str) and Path(found).is_file():
                return found, cfg, looked
    if cfg.get("url"):
        url_cache = cache_dir or os.path.expanduser("~/.cache/clip")
        path = os.path.join(url_cache, os.path.basename(cfg["url"]))
        looked.append(path)
        if Path(path).is_file():
            return path, cfg, looked
    return None, cfg, looked


def resolve_weights(
    architecture: str,
    checkpoint: str | None,
    pretrained: str | None,
    cache_dir: str | None,
    quick_gelu: bool | None,
) -> ResolvedWeights:
    """Resolve the options to a local weights file (no download, no model built).

    Raises:
        ConfigError: both checkpoint and pretrained set, unknown architecture or tag.
        DataError: the checkpoint file or the tag's cached file does not exist.
    """
    if checkpoint and pretrained:
        raise ConfigError(
            f"checkpoint {checkpoint!r} and pretrained {pretrained!r} both set; give one (set "
            f"pretrained: null to load the checkpoint)"
        )
    name, config_path = register_architecture(architecture)
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise DataError(
                f"checkpoint: {checkpoint!r} does not exist; give the path of a state dict "
                f"(.safetensors/.pt) of open_clip {name!r} (torch.save(model.state_dict()) or "
                f"safetensors.torch.save_file)"
            )
        return ResolvedWeights(name, config_path, str(checkpoint), "checkpoint", bool(quick_gelu))
    pretrained = pretrained or DEFAULT_TAG
    path, cfg, looked = cached_tag_file(name, pretrained, cache_dir)
    if path is None:
        raise DataError(
            f"pretrained: open_clip weights {name!r}/{pretrained!r} are not in the local cache "
            f"(looked for: {'; '.join(looked)}); nothing is downloaded at run time — "
            + _FETCH_HINT.format(arch=name, tag=pretrained)
        )
    preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    qg = cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu
    return ResolvedWeights(
        name, config_path, path, f"pretrained:{pretrained}", bool(qg), preprocess
    )


def load_model(weights: ResolvedWeights, device: torch.device) -> nn.Module:
    """Build the open_clip model and load ``weights`` strictly, offline; eval mode, float32.

    Raises:
        DataError: the file is not a state dict of this architecture (names the mismatch).
    """
    import open_clip

    with offline():
        try:
            model = open_clip.create_model(
                weights.architecture,
                pretrained=weights.path,  # a local file: open_clip's strict load_checkpoint
                force_quick_gelu=weights.quick_gelu,
                force_preprocess_cfg=weights.preprocess or None,
                pretrained_image=False,
                pretrained_text=False,
                device="cpu",
            )
        except Exception as exc:  # size mismatch, missing keys, not a checkpoint at all
            lines = str(exc).strip().splitlines()
            detail = _mismatch(weights) or " ".join(line.strip() for line in lines[:3])[:400]
            raise DataError(
                f"checkpoint: {weights.path!r} ({weights.source}) is not a state dict of open_clip "
                f"{weights.architecture!r}: {detail}; give weights saved from that architecture "
                f"or set architecture to the one they were saved from"
            ) from None
    return model.to(device).eval()


def _mismatch(weights: ResolvedWeights) -> str:
    """A one-line summary of how a state-dict file differs from the architecture ('' if unknown)."""
    import open_clip
    from open_clip.factory import load_state_dict

    try:
        saved = load_state_dict(weights.path)
        expected = open_clip.create_model(weights.architecture, pretrained_text=False).state_dict()
    except Exception as exc:
        return f"cannot be read as a state dict ({type(exc).__name__}: {str(exc)[:200]})"
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    shapes = [
        f"{k} expected {tuple(v.shape)} got {tuple(saved[k].shape)}"
        for k, v in expected.items()
        if k in saved and tuple(saved[k].shape) != tuple(v.shape)
    ]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensors differ in shape, e.g. {'; '.join(shapes[:2])}")
    if missing:
        parts.append(f"{len(missing)} tensors missing, e.g. {', '.join(missing[:2])}")
    if extra:
        parts.append(f"{len(extra)} unexpected tensors, e.g. {', '.join(extra[:2])}")
    return ", ".join(parts)
