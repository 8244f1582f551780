"""Hugging Face diffusers models for the ``ddpm-diffusers`` task: loading, checks, ε-wrapper, sampler.

Layout read from a local ``model_dir`` (``save_pretrained``; never a hub, ``local_files_only``):

* the U-Net: ``model_dir/unet/config.json`` + ``diffusion_pytorch_model.safetensors`` (or
  ``model_dir/config.json`` + weights, the ``google/ddpm-cifar10-32`` layout);
* the scheduler: ``model_dir/scheduler/scheduler_config.json`` (or
  ``model_dir/scheduler_config.json``). Only ``DDPMScheduler`` with ``prediction_type: epsilon``
  and a fixed variance is accepted.

Timesteps: ours are ``t = 1..T``, diffusers' ``0..T−1``; :class:`DiffusersEpsilon` calls
``unet(x_t, t − 1)``. The schedule is the scheduler's ``betas`` (so ``β_t = betas[t − 1]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attribution_core import ConfigError, DataError

UNET_CLASS = "UNet2DModel"
SCHEDULER_CLASS = "DDPMScheduler"
FIXED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


class DiffusersEpsilon(nn.Module):
    """``ε_θ(x_t, t)`` with ``t`` in 1..T: ``unet(x_t, t − 1).sample``, shape ``(B, C, H, W)``.

    The U-Net is the submodule ``unet`` (parameter names ``unet.*``).
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.unet(x_t, t - 1).sample


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(
            f"task.model_dir: {what} file {str(path)!r} does not exist; save the model with "
            f"save_pretrained (model_dir/unet/ and model_dir/scheduler/)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"task.model_dir: {str(path)!r} is not valid JSON ({exc})") from None


def unet_dir(model_dir: str) -> Path:
    """The folder holding the U-Net's ``config.json`` (``model_dir/unet`` or ``model_dir``)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise DataError(
            f"task.model_dir: {model_dir!r} does not exist; give a local folder written by "
            f"save_pretrained (downloads are never made)"
        )
    return root / "unet" if (root / "unet").is_dir() else root


def scheduler_file(model_dir: str) -> Path:
    """``model_dir/scheduler/scheduler_config.json`` or ``model_dir/scheduler_config.json``."""
    root = Path(model_dir)
    nested = root / "scheduler" / "scheduler_config.json"
    return (
        nested
        if nested.is_file() or (root / "scheduler").is_dir()
        else root / "scheduler_config.json"
    )


def load_unet_config(model_dir: str) -> tuple[dict[str, Any], Path]:
    """``(config, path)`` of the U-Net's ``config.json``; checks its ``_class_name``."""
    path = unet_dir(model_dir) / "config.json"
    config = _read_json(path, "U-Net config")
    check_unet_config(config, str(path))
    return config, path


def check_unet_config(config: dict[str, Any], where: str) -> None:
    """Raise ConfigError unless ``config`` is a ``UNet2DModel`` config with ``in == out`` channels."""
    name = config.get("_class_name", UNET_CLASS)
    if name != UNET_CLASS:
        raise ConfigError(
            f"{where}: _class_name {name!r} is not supported; ddpm-diffusers takes a "
            f"{UNET_CLASS} (ε-prediction U-Net)"
        )
    cin, cout = config.get("in_channels", 3), config.get("out_channels", 3)
    if cin != cout:
        raise ConfigError(
            f"{where}: out_channels {cout} != in_channels {cin}; an ε-prediction U-Net outputs "
            f"as many channels as it reads (learned variances are not supported)"
        )


def load_scheduler_config(model_dir: str) -> tuple[dict[str, Any], Path]:
    """``(config, path)`` of the scheduler config in ``model_dir``, checked."""
    path = scheduler_file(model_dir)
    config = _read_json(path, "scheduler config")
    check_scheduler_config(config, str(path))
    return config, path


def check_scheduler_config(config: dict[str, Any], where: str) -> None:
    """Raise ConfigError unless ``config`` is a DDPMScheduler predicting ε with a fixed variance."""
    name = config.get("_class_name", SCHEDULER_CLASS)
    if name != SCHEDULER_CLASS:
        raise ConfigError(
            f"{where}: _class_name {name!r} is not supported; ddpm-diffusers needs a "
            f"{SCHEDULER_CLASS} (save DDPMScheduler.from_config(...) instead)"
        )
    pred = config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise ConfigError(
            f"{where}: prediction_type {pred!r} is not supported; the measurements need 'epsilon'"
        )
    var = config.get("variance_type", "fixed_small")
    if var not in FIXED_VARIANCES:
        raise ConfigError(
            f"{where}: variance_type {var!r} is not supported; use one of {list(FIXED_VARIANCES)}"
        )


def build_scheduler(config: dict[str, Any]):
    """A ``DDPMScheduler`` from a (checked) config dict."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)


def sample_size(config: dict[str, Any]) -> tuple[int, int]:
    """``(H, W)`` from the U-Net config's ``sample_size`` (int or pair)."""
    s = config.get("sample_size")
    if s is None:
        raise ConfigError("task: the U-Net config has no sample_size; set it (image side)")
    if isinstance(s, int):
        return s, s
    return int(s[0]), int(s[1])


def make_unet(
    config: dict[str, Any], seed: int, plain_attention: bool, weights_dir: Path | None = None
) -> nn.Module:
    """A ``UNet2DModel``: weights from ``weights_dir`` if given, else initialised from ``seed``.

    ``plain_attention`` installs diffusers' ``AttnProcessor`` (matmul + softmax) in every
    attention layer: the default ``AttnProcessor2_0`` uses ``scaled_dot_product_attention``,
    which ``torch.func.vmap`` only runs through a slow per-example fallback. Its float32
    softmax upcast is switched off so that float64 stays float64, as with ``AttnProcessor2_0``.
    """
    from diffusers import UNet2DModel

    if weights_dir is not None:
        try:
            unet = UNet2DModel.from_pretrained(str(weights_dir), local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise DataError(
                f"task.model_dir: cannot load the U-Net weights in {str(weights_dir)!r}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            clean = {k: v for k, v in config.items() if not k.startswith("_")}
            unet = UNet2DModel.from_config(clean)
    if plain_attention:
        from diffusers.models.attention_processor import Attention, AttnProcessor

        for module in unet.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())
                # AttnProcessor would compute the softmax in float32 (an fp16 safeguard that
                # AttnProcessor2_0 does not apply): keep the model's own dtype (float64 exact)
                module.upcast_softmax = False
    return unet


@torch.no_grad()
def sample_with_scheduler(
    model: nn.Module,
    scheduler_config: dict[str, Any],
    n: int,
    shape: tuple[int, ...],
    seed: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    trajectory: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Ancestral sampling through ``DDPMScheduler.step`` over all ``T`` steps.

    ``x_T`` and every step's noise come from one CPU generator seeded by ``seed``. The
    scheduler's own options apply (``clip_sample``, ``variance_type``...).

    Returns:
        ``(x_0: (n, C, H, W), trajectory: (n, T+1, C, H, W) ordered x_T..x_0 or None)``.
    """
    sched = build_scheduler(scheduler_config)
    T = int(sched.config.num_train_timesteps)
    sched.set_timesteps(T)
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((n, *shape), generator=gen, dtype=dtype).to(device)
    states = [x] if trajectory else None
    for t in sched.timesteps.tolist():  # T−1 .. 0 in diffusers' indexing
        tt = torch.full((n,), t + 1, dtype=torch.int64, device=device)
        eps = model(x, tt)
        x = sched.step(eps, t, x, generator=gen).prev_sample.to(dtype)
        if states is not None:
            states.append(x)
    traj = torch.stack(states, dim=1) if states is not None else None
    return x, traj
