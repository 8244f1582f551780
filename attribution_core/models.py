"""Trained models: loaded from a file, or trained from a seed and cached by task and seed."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from attribution_core.errors import DataError
from attribution_core.gradient_cache import cache_key
from attribution_core.interfaces import Task
from attribution_core.storage import save_tensors


def dtype_name(task: Task) -> str:
    """``"float32"`` / ``"float64"``: the task's dtype as the config spells it."""
    return str(task.dtype).removeprefix("torch.")


def load_model(task: Task, path: str | Path, seed: int) -> nn.Module:
    """The task's model with weights from a ``.safetensors`` file, in eval mode.

    Raises:
        DataError: the file does not exist or does not fit the task's model.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"model.path: {str(path)!r} does not exist; give a .safetensors file")
    model = task.build_model(seed)
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for a corrupted header
        raise DataError(
            f"model.path: {str(path)!r} is not a readable .safetensors file "
            f"({type(exc).__name__}: {exc}); give the file a suite or `attribute` wrote"
        ) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DataError(
            f"model.path: {str(path)!r} does not fit task {task.name!r}: {exc}"
        ) from None
    return model.to(task.device).eval()


def trained_model(task: Task, seed: int, cache_dir: str | Path | None) -> nn.Module:
    """``task.base_model(seed)`` in eval mode, trained once per (task, seed, dtype) when cached.

    The cache file is ``<cache_dir>/models/<key>.safetensors``, keyed by the task's description,
    the seed and the dtype; without a cache directory the model is trained every call.
    """
    if cache_dir is None:
        return task.base_model(seed).eval()
    key = cache_key(task=task.describe(), seed=seed, dtype=dtype_name(task))
    path = Path(cache_dir) / "models" / f"{key}.safetensors"
    if path.is_file():
        model = task.build_model(seed)
        model.load_state_dict(load_file(str(path)))
        return model.to(task.device).eval()
    model = task.base_model(seed).eval()
    save_tensors(path, model.state_dict(), {"task": json.dumps(task.describe(), default=str)})
    return model
