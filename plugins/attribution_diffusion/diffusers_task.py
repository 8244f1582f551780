"""Task ``ddpm-diffusers``: a Hugging Face ``UNet2DModel`` + ``DDPMScheduler`` (your own DDPM).

The model comes from a local ``model_dir`` in diffusers' ``save_pretrained`` layout (see
:mod:`attribution_diffusion.diffusers_model`; never from a hub) or from a ``unet`` config dict
(+ optional ``scheduler`` dict). Everything else is ``ddpm-digits``' (this class subclasses
:class:`~attribution_diffusion.task.DDPMDigitsTask`): the same data loaders, measurements
(``loss``, ``timestep-loss``, ``neg-elbo``, ``trajectory-nll``, D-TRAK functions), weighted
training (``train``, vmapped ``train_ensemble``) and curvature problem (``MSELoss(sum)`` on
``(B, C·H·W)`` ε-outputs, ``scale = 1/(N·S)``). The noise schedule is the scheduler's ``betas``;
queries are sampled through ``DDPMScheduler.step``.

Model: :class:`~attribution_diffusion.diffusers_model.DiffusersEpsilon`, ``model(x_t, t)`` with
``t`` in 1..T (calls ``unet(x_t, t − 1)``). ``build_model(seed)`` is a freshly initialised U-Net
(used for retraining); ``base_model`` is the saved weights when ``pretrained`` (default).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from attribution_core import (
    Batch,
    ConfigError,
    TrainingRecipe,
    select_parameters,
    validate_model,
)
from attribution_diffusion.data import NATIVE_SIZE, load_images, take_examples
from attribution_diffusion.diffusers_model import (
    DiffusersEpsilon,
    build_scheduler,
    check_scheduler_config,
    check_unet_config,
    load_scheduler_config,
    load_unet_config,
    make_unet,
    sample_size,
    sample_with_scheduler,
    unet_dir,
)
from attribution_diffusion.schedule import Schedule
from attribution_diffusion.task import DataTrainingOptions, DDPMDigitsTask

log = logging.getLogger(__name__)


class DiffusersOptions(DataTrainingOptions):
    """Options of ``ddpm-diffusers`` (data and training options as in ``ddpm-digits``)."""

    model_dir: str | None = Field(
        None,
        description="Local save_pretrained folder: unet/ + scheduler/ (or config.json + "
        "scheduler_config.json at its top). Never downloaded.",
    )
    unet: dict[str, Any] | None = Field(
        None, description="UNet2DModel config (instead of model_dir; weights are trained)."
    )
    scheduler: dict[str, Any] | None = Field(
        None, description="DDPMScheduler config used with `unet` (None = diffusers defaults)."
    )
    pretrained: bool = Field(
        True, description="Base model = the weights in model_dir (False: train from scratch)."
    )
    plain_attention: bool = Field(
        True, description="Use diffusers' AttnProcessor (vmap-friendly) in attention layers."
    )
    image_size: int | None = Field(
        None,
        ge=1,
        description="Resize images to this side (None: the source's size; folder: sample_size).",
    )
    train_steps: int = Field(1000, ge=1, description="Adam steps on all of D (retraining).")
    lr: float = Field(2e-4, gt=0.0, description="Adam learning rate.")

    @model_validator(mode="after")
    def _source(self) -> DiffusersOptions:
        if (self.model_dir is None) == (self.unet is None):
            raise ValueError("give exactly one of model_dir (a save_pretrained folder) or unet")
        if self.model_dir is not None and self.scheduler is not None:
            raise ValueError("scheduler is read from model_dir; drop the scheduler option")
        return self


class DiffusersDDPMTask(DDPMDigitsTask):
    """DDPM with a diffusers ``UNet2DModel`` + ``DDPMScheduler``; see :class:`DiffusersOptions`."""

    name = "ddpm-diffusers"

    def __init__(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", **options: Any
    ) -> None:
        opts: DiffusersOptions = validate_model(DiffusersOptions, options, where="task")  # type: ignore[assignment]
        self.opts = opts  # type: ignore[assignment]
        self.dtype, self.device = dtype, torch.device(device)
        if opts.model_dir is not None:
            self.unet_config, unet_file = load_unet_config(opts.model_dir)
            self.scheduler_config, sched_file = load_scheduler_config(opts.model_dir)
            self._files = [unet_file, sched_file]
            unet_where, sched_where = str(unet_file), str(sched_file)
        else:
            self.unet_config = dict(opts.unet or {})
            self.scheduler_config = {"_class_name": "DDPMScheduler", **(opts.scheduler or {})}
            unet_where, sched_where = "task.unet", "task.scheduler"
            check_unet_config(self.unet_config, unet_where)
            check_scheduler_config(self.scheduler_config, sched_where)
            self._files = []
        scheduler = build_scheduler(self.scheduler_config)
        h, w = sample_size(self.unet_config)
        size = opts.image_size or NATIVE_SIZE.get(opts.data, h)
        x, labels = load_images(opts.data, opts.path, opts.classes, size, opts.grayscale)
        self._check_fit(x, unet_where, h, w)
        x, labels = take_examples(x, labels, opts.n_train, opts.cycle, opts.classes)
        self._x = x.to(self.device, self.dtype)
        self.labels = labels
        self.image_shape = tuple(x.shape[1:])  # type: ignore[assignment]
        self.n_samples = opts.n_samples
        self.schedule = Schedule.from_betas(scheduler.betas, dtype, self.device)
        self.train_config = opts.train_config()
        self._sched_where = sched_where
        self._logged = False

    def _check_fit(self, x: Tensor, where: str, h: int, w: int) -> None:
        c = int(self.unet_config.get("in_channels", 3))
        if x.shape[1] != c:
            raise ConfigError(
                f"{where}: in_channels {c} != the data's {x.shape[1]} channels "
                f"(task.data {self.opts.data!r}); use a U-Net for {x.shape[1]} channels"
                + (" or task.grayscale" if self.opts.data == "folder" else "")
            )
        if (x.shape[2], x.shape[3]) != (h, w):
            raise ConfigError(
                f"{where}: sample_size {self.unet_config.get('sample_size')} does not match the "
                f"data's {x.shape[2]}×{x.shape[3]} images; set task.image_size: {h} to resize "
                f"the data, or use a U-Net with that sample_size"
            )
        levels = len(self.unet_config.get("block_out_channels", (64,) * 4))
        factor = 2 ** max(0, levels - 1)
        if h % factor or w % factor:
            raise ConfigError(
                f"{where}: sample_size {h}×{w} is not divisible by 2^{levels - 1} = {factor} "
                f"(one halving per down block); change sample_size or block_out_channels"
            )

    # ---- models ----------------------------------------------------------------------------
    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised U-Net (from ``seed``), wrapped as ``model(x_t, t)``, eval mode."""
        unet = make_unet(self.unet_config, seed, self.opts.plain_attention)
        return self._finish(unet)

    def base_model(self, seed: int) -> nn.Module:
        """The saved weights (``pretrained`` and ``model_dir``), else trained from ``seed``."""
        if self.opts.model_dir is not None and self.opts.pretrained:
            unet = make_unet(
                self.unet_config, seed, self.opts.plain_attention, unet_dir(self.opts.model_dir)
            )
            return self._finish(unet)
        return super().base_model(seed)

    def training_recipe(self) -> TrainingRecipe:
        """The training-step hook's recipe; refused for ``pretrained`` weights (not our run).

        Raises:
            ConfigError: ``pretrained: true`` with a ``model_dir``.
        """
        if self.opts.model_dir is not None and self.opts.pretrained:
            raise ConfigError(
                "task.pretrained: true — the base model's weights were loaded from model_dir, "
                "not trained by this task, so its training cannot be replayed step by step; set "
                "task.pretrained: false to train the base model from the seed"
            )
        return super().training_recipe()

    def _finish(self, unet: nn.Module) -> nn.Module:
        model = DiffusersEpsilon(unet).to(self.device, self.dtype).eval()
        if not self._logged:
            included, excluded = select_parameters(model)
            kinds = Counter(
                type(model.get_submodule(n.rsplit(".", 1)[0])).__name__ for n in excluded
            )
            log.info(
                "ddpm-diffusers: %d parameters in %d Linear/Conv2d tensors are attributed "
                "(K-FAC covers these); excluded (held fixed): %d parameters in %s",
                sum(p.numel() for p in included.values()),
                len(included),
                sum(p.numel() for n, p in model.named_parameters() if n in excluded),
                ", ".join(f"{c} {k} tensors" for k, c in sorted(kinds.items())) or "none",
            )
            self._logged = True
        return model

    # ---- sampling --------------------------------------------------------------------------
    def sample(
        self, model: nn.Module, n: int, seed: int, *, trajectory: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``n`` samples through ``DDPMScheduler.step`` (all T steps): ``(x_0, trajectory|None)``."""
        model.eval()
        return sample_with_scheduler(
            model,
            self.scheduler_config,
            n,
            self.image_shape,
            seed,
            dtype=self.dtype,
            device=self.device,
            trajectory=trajectory,
        )

    def make_queries(self, model: nn.Module, n: int, seed: int) -> Batch:
        """Generated samples with their trajectories: ``{"x": (n, C, H, W), "trajectory"}``."""
        x, traj = self.sample(model, n, seed, trajectory=True)
        return {"x": x, "trajectory": traj}  # type: ignore[dict-item]

    # ---- outputs ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Name, options and a SHA-256 of the files in ``model_dir`` (for cache keys)."""
        out = {"name": self.name, **self.opts.described()}
        if self.opts.model_dir is not None:
            out["model_sha256"] = _digest(Path(self.opts.model_dir))
        return out


def _digest(root: Path) -> str:
    """SHA-256 over the relative names and bytes of every file under ``root``."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
