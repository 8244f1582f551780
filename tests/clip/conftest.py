"""Fixtures: a tiny untrained open_clip architecture saved to a local checkpoint; no network."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
}
OTHER_CONFIG = {  # same family, different widths: a checkpoint of "another architecture"
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
}


def save_architecture(folder: Path, stem: str, cfg: dict, seed: int) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and an untrained model's weights ``<stem>.safetensors``.

    The model is built straight from ``open_clip.model.CLIP`` (not through the plugin).
    """
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    config = folder / f"{stem}.json"
    config.write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = CLIP(**cfg)
    weights = folder / f"{stem}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    """``(config .json, checkpoint .safetensors)`` of the tiny architecture ``tiny-clip-test``."""
    return save_architecture(tmp_path_factory.mktemp("clip"), "tiny-clip-test", TINY_CONFIG, 0)


@pytest.fixture(scope="session")
def other_clip(tmp_path_factory) -> tuple[Path, Path]:
    """The same for a wider architecture ``tiny-clip-other``."""
    return save_architecture(tmp_path_factory.mktemp("clip"), "tiny-clip-other", OTHER_CONFIG, 1)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
