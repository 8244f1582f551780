"""Bring your own diffusers DDPM: save a UNet2DModel + DDPMScheduler, attribute its samples.

python examples/own_diffusers_model.py [--small] [--model-dir DIR]

Without ``--model-dir`` a tiny random-weight U-Net is built and saved with ``save_pretrained``
(``DIR/unet`` + ``DIR/scheduler``, the layout of ``google/ddpm-cifar10-32``) to a temporary
folder, then ``kfac-influence`` and ``grad-dot`` attribute generated samples to the 8×8 digits
it would be trained on. With ``--model-dir`` your own folder is used as it is (never a hub
download; CIFAR-size models want ``data: cifar10`` and a GPU, see
docs/bring-your-own-model.md).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from attribution_core import attribute

small = "--small" in sys.argv
model_dir = sys.argv[sys.argv.index("--model-dir") + 1] if "--model-dir" in sys.argv else None
torch.set_num_threads(1 if small else max(1, torch.get_num_threads()))

with tempfile.TemporaryDirectory() as tmp:
    if model_dir is None:
        model_dir = str(Path(tmp) / "my-ddpm")
        torch.manual_seed(0)
        unet = UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
        )
        unet.save_pretrained(f"{model_dir}/unet")
        DDPMScheduler(num_train_timesteps=50 if small else 1000).save_pretrained(
            f"{model_dir}/scheduler"
        )

    config = {
        "task": {
            "name": "ddpm-diffusers",
            "model_dir": model_dir,  # the weights in it are the model attributed
            "data": "digits",
            "classes": [0, 1],
            "n_train": 24 if small else None,
            "n_samples": 2 if small else 8,  # (t, ε) draws per example
        },
        "queries": {"count": 2 if small else 8, "seed": 0},  # samples through the scheduler
        "methods": ["kfac-influence", "grad-dot"],
        "threads": torch.get_num_threads(),
    }
    result = attribute(config)
    labels = result.task.labels
    for label, scores in result.scores.items():
        top = np.argsort(-scores[:, 0])[:5]
        print(
            f"{label}: scores {scores.shape}; query 0 top helpers (index, digit):",
            [(int(j), int(labels[j])) for j in top],
        )
