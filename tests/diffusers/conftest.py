"""Fixtures for the diffusers adapter tests: tiny ``UNet2DModel`` folders written by save_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "norm_num_groups": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 4,
}
T_TINY = 50


def save_tiny(
    root: Path, *, scheduler: str = "DDPMScheduler", seed: int = 0, **unet_overrides
) -> Path:
    """Write ``root/unet`` (random-weight UNet2DModel) and ``root/scheduler``; returns ``root``."""
    import diffusers
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    UNet2DModel(**{**TINY_UNET, **unet_overrides}).save_pretrained(root / "unet")
    sched_cls = getattr(diffusers, scheduler)
    sched_cls(num_train_timesteps=T_TINY, clip_sample=False).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight UNet2DModel (sample 8×8, 1 channel) + DDPMScheduler(T = 50)."""
    return save_tiny(tmp_path_factory.mktemp("tiny_unet"))


@pytest.fixture
def make_model_dir(tmp_path):
    """``(**overrides) -> folder`` with a tiny model saved under ``tmp_path``."""
    counter = iter(range(1000))

    def make(**kwargs) -> Path:
        return save_tiny(tmp_path / f"m{next(counter)}", **kwargs)

    return make
