"""Checkpoints: ``model.safetensors`` (weights) + ``model.json`` (the task's resolved options).

Loading reads tensors and JSON only: nothing is unpickled, no code is imported from the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from attribution_core import DataError, atomic_write_json, save_tensors
from attribution_diffusion.task import DDPMDigitsTask


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_suffix(".safetensors")
    return p, p.with_suffix(".json")


def save_checkpoint(model: nn.Module, task: DDPMDigitsTask, path: str | Path) -> Path:
    """Write ``PATH.safetensors`` and ``PATH.json``; returns the ``.safetensors`` path."""
    weights, config = _paths(path)
    desc = task.describe()
    save_tensors(weights, model.state_dict(), {"task": json.dumps(desc, sort_keys=True)})
    atomic_write_json(config, {"task": desc, "dtype": str(task.dtype).removeprefix("torch.")})
    return weights


def load_checkpoint(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[DDPMDigitsTask, nn.Module]:
    """``(task, model)`` rebuilt from ``PATH.json`` and ``PATH.safetensors`` (eval mode).

    Raises:
        DataError: a file is missing or the weights do not fit the recorded task.
    """
    from safetensors.torch import load_file

    weights, config = _paths(path)
    for f in (weights, config):
        if not f.is_file():
            raise DataError(f"checkpoint: {str(f)!r} does not exist; save with save_checkpoint")
    meta = json.loads(config.read_text())
    options = {k: v for k, v in meta["task"].items() if k != "name"}
    dt = dtype or {"float32": torch.float32, "float64": torch.float64}[meta.get("dtype", "float32")]
    task = DDPMDigitsTask(dtype=dt, device=device, **options)
    model = task.build_model(0)
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise DataError(f"checkpoint: {str(weights)!r} does not fit its task: {exc}") from None
    return task, model.to(task.device, task.dtype).eval()
