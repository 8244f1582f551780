"""DDPM diffusion task (``ddpm-digits``), U-Net, samplers and the paper's measurements.

Public API::

    from attribution_diffusion import DDPMDigitsTask, save_checkpoint, load_checkpoint
"""

from __future__ import annotations

from attribution_diffusion.checkpoints import load_checkpoint, save_checkpoint
from attribution_diffusion.task import DDPMDigitsTask, DDPMOptions, EpsilonOutput
from attribution_diffusion.unet import UNet

__all__ = [
    "DDPMDigitsTask",
    "DDPMOptions",
    "EpsilonOutput",
    "UNet",
    "load_checkpoint",
    "save_checkpoint",
]
