"""Training checkpoints for TracIn: replayed by the task, cached on disk, checked bit for bit.

Cache layout (when the run has a ``cache_dir``)::

    <cache_dir>/checkpoints/<key>/step_<k>.safetensors   state (+ exp_avg.* / exp_avg_sq.*)
    <cache_dir>/checkpoints/<key>/index.json              steps, η_k, Adam β and ε, key parts

``key`` hashes the task's description, the seed, ``every``, whether Adam moments are kept and
the dtype; ``index.json`` is written last (atomically), so a half-written directory is replayed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from attribution_core import (
    Checkpoint,
    ConfigError,
    Task,
    atomic_write_json,
    cache_key,
    save_tensors,
)

TASKS_WITH_HOOK = "linear-regression (solver: gd), digits-classifier, ddpm-digits"


def training_checkpoints(
    task: Task, seed: int, every: int, *, adam: bool, cache_dir: str | Path | None
) -> tuple[list[Checkpoint], bool]:
    """``(checkpoints, read_from_cache)`` of ``task``'s base-model training from ``seed``.

    Raises:
        ConfigError: the task does not implement :meth:`Task.checkpoints` (names the hook).
    """
    if type(task).checkpoints is Task.checkpoints:
        raise ConfigError(_no_hook(task))
    parts = {
        "task": task.describe(),
        "seed": int(seed),
        "every": int(every),
        "adam": bool(adam),
        "dtype": str(task.dtype),
    }
    root = Path(cache_dir) / "checkpoints" / cache_key(**parts) if cache_dir else None
    if root is not None and (cached := _load(root, parts, task.device)) is not None:
        return cached, True
    try:
        checkpoints = task.checkpoints(int(seed), int(every), optimizer_state=adam)
    except NotImplementedError as exc:
        raise ConfigError(f"{_no_hook(task)} ({exc})") from None
    if not checkpoints:
        raise ConfigError(f"task {task.name!r}: Task.checkpoints returned no checkpoint")
    if root is not None:
        _save(root, parts, checkpoints)
    return checkpoints, False


def _no_hook(task: Task) -> str:
    return (
        f"method tracin: task {task.name!r} does not implement the Task.checkpoints hook "
        f"(replaying its base model's training from a seed), which TracIn needs; tasks with "
        f"the hook: {TASKS_WITH_HOOK}"
    )


def check_final_state(model: nn.Module, final: Checkpoint, task: Task, seed: int) -> None:
    """Refuse unless ``model``'s state equals the replay's last checkpoint bit for bit.

    Raises:
        ConfigError: keys differ, or a tensor differs (names it and the largest difference).
    """
    state = model.state_dict()
    fix = (
        f"the model was not trained by task {task.name!r}'s recipe from seed {seed}; set the "
        f"method's model_seed to the config's model.seed (and do not attribute model.path "
        f"weights trained elsewhere)"
    )
    if set(state) != set(final.state):
        diff = sorted(set(state) ^ set(final.state))[:5]
        raise ConfigError(f"tracin: replayed state mismatch: keys {diff} differ; {fix}")
    for k, v in state.items():
        r = final.state[k].to(v.device)
        if r.dtype != v.dtype or r.shape != v.shape or not torch.equal(r, v):
            gap = (r.double() - v.double()).abs().max() if r.shape == v.shape else float("nan")
            raise ConfigError(
                f"tracin: replayed final state mismatch: {k!r} differs from the attributed "
                f"model (max abs {float(gap):.3g}, step {final.step}); {fix}"
            )


def _save(root: Path, parts: dict[str, Any], checkpoints: list[Checkpoint]) -> None:
    entries = []
    for ck in checkpoints:
        tensors = {f"state.{k}": v for k, v in ck.state.items()}
        for prefix, moments in (("exp_avg", ck.exp_avg), ("exp_avg_sq", ck.exp_avg_sq)):
            tensors.update({f"{prefix}.{k}": v for k, v in (moments or {}).items()})
        save_tensors(root / f"step_{ck.step}.safetensors", tensors)
        entries.append(
            {
                "step": ck.step,
                "lr": ck.lr,
                "betas": list(ck.betas),
                "eps": ck.eps,
                "moments": ck.exp_avg_sq is not None,
            }
        )
    atomic_write_json(root / "index.json", {"parts": parts, "checkpoints": entries})


def _load(root: Path, parts: dict[str, Any], device: torch.device) -> list[Checkpoint] | None:
    index = root / "index.json"
    if not index.is_file():
        return None
    meta = json.loads(index.read_text())
    if meta.get("parts") != json.loads(json.dumps(parts, default=str)):
        return None  # a hash collision or an edited file: replay instead
    out = []
    for e in meta["checkpoints"]:
        t = load_file(str(root / f"step_{e['step']}.safetensors"), device=str(device))
        moments = e["moments"]
        out.append(
            Checkpoint(
                step=int(e["step"]),
                state=_prefixed(t, "state."),
                lr=float(e["lr"]),
                exp_avg=_prefixed(t, "exp_avg.") if moments else None,
                exp_avg_sq=_prefixed(t, "exp_avg_sq.") if moments else None,
                betas=(float(e["betas"][0]), float(e["betas"][1])),
                eps=float(e["eps"]),
            )
        )
    return out


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
