"""Task ``ddpm-digits``: a small DDPM on 8×8 digits (default), CIFAR-10 or an image folder.

Data: ``{"x": (N, C, H, W)}`` in [-1, 1]. Model: :class:`~attribution_diffusion.unet.UNet`,
``model(x_t, t)`` with ``t: (B,)`` int64 in 1..T. Queries: ancestral DDPM samples with their
trajectories, ``{"x": (n, C, H, W), "trajectory": (n, T+1, C, H, W)}`` (x_T..x_0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from attribution_core import (
    DESCRIPTION_BASELINE,
    AdamEpsOption,
    Batch,
    Checkpoint,
    CurvatureProblem,
    DrawStreams,
    OptimizerOption,
    Params,
    StepBatch,
    Task,
    TrainingRecipe,
    WarmupStepsOption,
    recipe_description,
    validate_model,
)
from attribution_diffusion import steps, training
from attribution_diffusion.data import NATIVE_SIZE, load_images, take_examples
from attribution_diffusion.fit_rows import FitRows, x_t_rows
from attribution_diffusion.measurements import EpsLoss
from attribution_diffusion.replay import replay_checkpoints
from attribution_diffusion.sampling import sample_ddim, sample_ddpm
from attribution_diffusion.schedule import Schedule
from attribution_diffusion.unet import UNet, check_image_size


class DataTrainingOptions(BaseModel):
    """Data and training options shared by ``ddpm-digits`` and ``ddpm-diffusers``."""

    model_config = ConfigDict(extra="forbid")
    data: Literal["digits", "cifar10", "folder"] = Field("digits", description="Image source.")
    path: str | None = Field(
        None, description="Local folder for cifar10 / folder (never downloaded)."
    )
    classes: list[int] = Field([0, 1], description="Class indices (digits/cifar10: 0–9).")
    n_train: int | None = Field(
        None, ge=1, description="First n examples of those classes (None = all)."
    )
    cycle: bool = Field(
        False,
        description="n_train above the examples of the classes repeats them in order (scale "
        "benchmarks: N = 20,000 from the digits).",
    )
    image_size: int | None = Field(
        None, ge=1, description="Side in pixels (None: 8 digits, 32 otherwise)."
    )
    grayscale: bool = Field(False, description="folder only: load images as one channel.")
    train_steps: int = Field(1000, ge=1, description="Optimiser steps on all of D.")
    batch_size: int = Field(64, ge=1, description="Minibatch size.")
    lr: float = Field(2e-3, gt=0.0, description="Learning rate (after the warm-up).")
    scale_steps: bool = Field(True, description="Steps × kept fraction (half data → half steps).")
    ema: bool = Field(False, description="Use an EMA of the weights everywhere.")
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay per step.")
    n_samples: int = Field(
        8, ge=1, description="Default (t, ε) draws per example for measurements."
    )
    optimizer: OptimizerOption = "adam"
    adam_eps: AdamEpsOption = 1e-8
    warmup_steps: WarmupStepsOption = 0

    def train_config(self) -> training.TrainConfig:
        """The training hyper-parameters (``Task.train`` and the training-step hook share them)."""
        return training.TrainConfig(
            self.train_steps,
            self.batch_size,
            self.lr,
            self.scale_steps,
            self.ema,
            self.ema_decay,
            self.optimizer,
            self.adam_eps,
            self.warmup_steps,
        )

    def described(self) -> dict[str, Any]:
        """``model_dump()`` with the recipe options written relative to the core's description
        baseline (torch's Adam), whatever this task's defaults: a run recorded before the
        ``ddpm-digits`` default became ``adam_eps`` 1e-2 keeps its description and cache keys."""
        out = self.model_dump()
        for name in DESCRIPTION_BASELINE:
            del out[name]
        return {**out, **recipe_description(self.optimizer, self.adam_eps, self.warmup_steps)}

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int]) -> list[int]:
        bad = [c for c in v if not 0 <= c <= 9]
        if bad or not v:
            raise ValueError(f"classes must be distinct class indices in 0–9, got {v}")
        return sorted(set(v))


class DDPMOptions(DataTrainingOptions):
    """Options of ``ddpm-digits``."""

    T: int = Field(1000, ge=2, description="Diffusion timesteps.")
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0, description="β_1 of the linear schedule.")
    beta_end: float = Field(0.02, gt=0.0, lt=1.0, description="β_T of the linear schedule.")
    width: int = Field(16, ge=1, description="U-Net base channels.")
    channel_mult: list[int] = Field(
        [1, 2], min_length=1, description="Channels per level (× width)."
    )
    num_res_blocks: int = Field(1, ge=1, description="Residual blocks per level.")
    sampler: Literal["ddpm", "ddim"] = Field("ddpm", description="Query sampler.")
    ddim_steps: int = Field(50, ge=1, description="DDIM steps (sampler: ddim).")
    adam_eps: AdamEpsOption = Field(
        1e-2,
        description="Adam's ε: 1e-2, the metasmoothness sweep's choice (smooth in the "
        "training-data weights; torch's 1e-8 is not — docs/metagradient.md).",
    )

    @field_validator("channel_mult")
    @classmethod
    def _mult(cls, v: list[int]) -> list[int]:
        if any(m < 1 for m in v):
            raise ValueError(f"channel_mult entries must be ≥ 1, got {v}")
        return v

    @model_validator(mode="after")
    def _schedule(self) -> DDPMOptions:
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must be ≥ beta_start ({self.beta_start})")
        return self


class EpsilonOutput(nn.Module):
    """``{"x_t": (B, C, H, W), "t": (B,)} -> ε_θ(x_t, t).reshape(B, C·H·W)`` (shares the U-Net)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        out = self.unet(inputs["x_t"], inputs["t"])
        return out.reshape(out.shape[0], -1)


class DDPMDigitsTask(Task):
    """DDPM with the linear β schedule; see :class:`DDPMOptions` and ``docs/diffusion.md``."""

    name = "ddpm-digits"

    def __init__(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", **options: Any
    ) -> None:
        opts: DDPMOptions = validate_model(DDPMOptions, options, where="task")  # type: ignore[assignment]
        self.opts = opts
        self.dtype, self.device = dtype, torch.device(device)
        size = opts.image_size or NATIVE_SIZE.get(opts.data, 32)
        check_image_size(size, opts.channel_mult)
        x, labels = load_images(opts.data, opts.path, opts.classes, size, opts.grayscale)
        x, labels = take_examples(x, labels, opts.n_train, opts.cycle, opts.classes)
        self._x = x.to(self.device, self.dtype)
        self.labels = labels
        self.image_shape: tuple[int, int, int] = tuple(x.shape[1:])  # type: ignore[assignment]
        self.n_samples = opts.n_samples
        self.schedule = Schedule.linear(opts.T, opts.beta_start, opts.beta_end, dtype, self.device)
        self.train_config = opts.train_config()

    @classmethod
    def full_step_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` with ``scale_steps`` off: a subset trains for all ``train_steps``.

        Also used by ``ddpm-diffusers`` (a subclass with the same training options).
        """
        return {**options, "scale_steps": False}

    # ---- data and models -------------------------------------------------------------------
    def train_data(self) -> Batch:
        """``{"x": (N, C, H, W)}`` in [-1, 1]."""
        return {"x": self._x}

    def build_model(self, seed: int) -> nn.Module:
        """A fresh U-Net initialised from ``seed`` (the global RNG state is left untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = UNet(
                self.image_shape[0],
                self.opts.width,
                self.opts.channel_mult,
                self.opts.num_res_blocks,
                self.opts.T,
            )
        return model.to(self.device, self.dtype).eval()

    def train(self, model: nn.Module, weights: Tensor, seed: int) -> nn.Module:
        """Adam (or SGD) on the weighted ε-loss (see :mod:`attribution_diffusion.training`)."""
        return training.train(
            model, self._x, weights.to(self.dtype), seed, self.schedule, self.train_config
        )

    def train_ensemble(self, weights: Tensor, seeds: Sequence[int]) -> list[nn.Module]:
        """``M`` models at once: ``weights: (M, N)``; equals separate :meth:`train` calls."""
        return training.train_ensemble(
            self.build_model,
            self._x,
            weights.to(self.dtype),
            seeds,
            self.schedule,
            self.train_config,
        )

    def checkpoints(
        self, seed: int, every: int, *, optimizer_state: bool = False
    ) -> list[Checkpoint]:
        """States after steps ``every, 2·every, …, T`` of ``base_model(seed)``'s Adam run."""
        return replay_checkpoints(
            self.build_model,
            self._x,
            seed,
            every,
            self.schedule,
            self.train_config,
            optimizer_state=optimizer_state,
        )

    # ---- training-step hook (single-model retraining, metagradients) -------------------------
    def training_recipe(self) -> TrainingRecipe:
        """``optimizer`` at ``lr`` (``adam_eps``, ``warmup_steps``) for ``train_steps`` steps (the
        base model's), EMA when ``ema``."""
        self._step_module  # built here, outside any torch.func transform  # noqa: B018
        return steps.recipe(self.train_config)

    def draw_stream(self, seed: int, step: int) -> StepBatch:
        """Step ``step``'s indices over all N, ``t`` and ``ε`` (see :mod:`.steps`)."""
        self._step_module  # built here, outside any torch.func transform  # noqa: B018
        return self._draw_streams(seed, step)

    def step_loss(self, params: Params, batch: StepBatch, weights: Tensor) -> Tensor:
        """``mean_b w_{i_b} ‖ε_b − ε_θ(x_t, t)‖²`` over the step's ``B`` slots."""
        return steps.step_loss(self._step_module, self.schedule, self._x, params, batch, weights)

    @cached_property
    def _draw_streams(self) -> DrawStreams:
        n, T, bs = self._x.shape[0], self.schedule.T, self.train_config.batch_size
        return DrawStreams(lambda gen, step: steps.draw(gen, n, self._x, T, bs))

    @cached_property
    def _step_module(self) -> nn.Module:
        """A U-Net whose parameters :meth:`step_loss` replaces (built once)."""
        return self.build_model(0).train()

    # ---- sampling --------------------------------------------------------------------------
    def sample(
        self, model: nn.Module, n: int, seed: int, *, trajectory: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``n`` samples from ``seed`` with the configured sampler: ``(x_0, trajectory or None)``."""
        model.eval()
        if self.opts.sampler == "ddim":
            return sample_ddim(
                model,
                self.schedule,
                n,
                self.image_shape,
                seed,
                steps=self.opts.ddim_steps,
                trajectory=trajectory,
            )
        return sample_ddpm(model, self.schedule, n, self.image_shape, seed, trajectory=trajectory)

    def make_queries(self, model: nn.Module, n: int, seed: int) -> Batch:
        """Generated samples: ``{"x", "trajectory"}`` (DDPM) or ``{"x"}`` (DDIM)."""
        x, traj = self.sample(model, n, seed, trajectory=self.opts.sampler == "ddpm")
        return {"x": x} if traj is None else {"x": x, "trajectory": traj}

    # ---- measurements and curvature ----------------------------------------------------------
    def training_loss(self, n_samples: int | None = None) -> EpsLoss:
        """``ℓ(θ, x) = E_{t,ε} ‖ε − ε_θ(x_t, t)‖²`` with ``n_samples`` draws (paper eq. 2)."""
        return EpsLoss(self.schedule, n_samples or self.n_samples)

    def curvature_problem(self, model: nn.Module, seed: int, n_samples: int) -> CurvatureProblem:
        """``MSELoss(sum)`` of ``ε_θ(x_t, t)`` against ε over N·S rows, ``scale = 1/(N·S)``.

        ``scale · GGN = (2/(N·S)) Σ JᵀJ`` — the design's ``GGN^model``. Each pass draws fresh
        (t, ε), example ``i``'s from a generator seeded by ``(seed, pass_index, i)``
        (:class:`~attribution_diffusion.fit_rows.FitRows`), so data shards see the same rows.
        """
        n, s = self._x.shape[0], int(n_samples)
        return CurvatureProblem(
            model=EpsilonOutput(model),
            loss_function=nn.MSELoss(reduction="sum"),
            batches=FitRows(self._x, self.schedule, s, int(seed), chunk=max(1, 512 // s)),
            scale=1.0 / (n * s),
            batch_size_fn=x_t_rows,
            n_rows=n * s,
            per_example=s,
        )

    # ---- outputs ---------------------------------------------------------------------------
    def images(self, batch: Batch) -> Tensor:
        """``(B, C, H, W)`` in [0, 1]."""
        return ((batch["x"] + 1.0) / 2.0).clamp(0.0, 1.0)

    def describe(self) -> dict[str, Any]:
        """Name and resolved options (recorded in manifests, checkpoints and cache keys)."""
        return {"name": self.name, **self.opts.described()}

    @property
    def pixels(self) -> int:
        """``D = C·H·W``."""
        return math.prod(self.image_shape)
