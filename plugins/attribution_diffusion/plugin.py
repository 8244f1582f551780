"""Registers the task ``ddpm-digits`` and the diffusion measurements."""

from __future__ import annotations

from attribution_core import Component, hookimpl
from attribution_diffusion.diffusers_task import DiffusersDDPMTask, DiffusersOptions
from attribution_diffusion.measurements import (
    EpsOptions,
    TimestepLossOptions,
    TrajectoryOptions,
    l1_norm_factory,
    l2_norm_factory,
    neg_elbo_factory,
    square_norm_factory,
    timestep_loss_factory,
    trajectory_nll_factory,
)
from attribution_diffusion.task import DDPMDigitsTask, DDPMOptions


@hookimpl
def attribution_register_components() -> list[Component]:
    """Tasks ddpm-digits, ddpm-diffusers; targets timestep-loss, neg-elbo, trajectory-nll; D-TRAK functions."""
    return [
        Component(
            "task",
            "ddpm-digits",
            DDPMDigitsTask,
            "DDPM U-Net on 8x8 digits (or CIFAR-10 / an image folder), ε-loss.",
            DDPMOptions,
        ),
        Component(
            "task",
            "ddpm-diffusers",
            DiffusersDDPMTask,
            "Your diffusers UNet2DModel + DDPMScheduler (local save_pretrained folder), ε-loss.",
            DiffusersOptions,
        ),
        Component(
            "measurement",
            "timestep-loss",
            timestep_loss_factory,
            "ℓ_t = E_ε‖ε − ε_θ(x_t, t)‖² at a given t (diffusion target).",
            TimestepLossOptions,
        ),
        Component(
            "measurement",
            "neg-elbo",
            neg_elbo_factory,
            "−ELBO in nats per image (diffusion target).",
            EpsOptions,
        ),
        Component(
            "measurement",
            "trajectory-nll",
            trajectory_nll_factory,
            "−log p_θ(x_0:T) of the sampling trajectory (diffusion target).",
            TrajectoryOptions,
        ),
        Component(
            "measurement",
            "square-norm",
            square_norm_factory,
            "‖ε_θ(x_t, t)‖² (D-TRAK function, not a target).",
            EpsOptions,
        ),
        Component(
            "measurement",
            "l1-norm",
            l1_norm_factory,
            "‖ε_θ(x_t, t)‖₁ (D-TRAK function, not a target).",
            EpsOptions,
        ),
        Component(
            "measurement",
            "l2-norm",
            l2_norm_factory,
            "‖ε_θ(x_t, t)‖₂ (D-TRAK function, not a target).",
            EpsOptions,
        ),
    ]
