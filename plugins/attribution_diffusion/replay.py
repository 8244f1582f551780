"""Training checkpoints of ``ddpm-digits`` (:meth:`attribution_core.Task.checkpoints`).

The replay runs :func:`attribution_diffusion.training.adam_steps` — the loop :func:`train` runs —
from ``build_model(seed)`` with every weight 1, so its last state is ``base_model(seed)`` bit for
bit. EMA runs are refused: the attributed EMA weights are not an iterate of the run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from attribution_core import Checkpoint, ConfigError
from attribution_diffusion import training
from attribution_diffusion.schedule import Schedule


def replay_checkpoints(
    build: Callable[[int], nn.Module],
    x: Tensor,
    seed: int,
    every: int,
    schedule: Schedule,
    cfg: training.TrainConfig,
    *,
    optimizer_state: bool = False,
) -> list[Checkpoint]:
    """States after steps ``every, 2·every, …, T`` of the run on all of ``x: (N, C, H, W)``.

    Raises:
        ConfigError: ``every < 1``, or ``ema: true`` (see module docstring).
    """
    if int(every) < 1:
        raise ConfigError(f"every: {every} < 1; keep a checkpoint every ≥ 1 training steps")
    if cfg.ema:
        raise ConfigError(
            "task.ema: true — the attributed model is the EMA of the weights, not a state of "
            "the training run, so there are no checkpoints that end in it; set task.ema: false"
        )
    model = build(int(seed))
    ones = torch.ones(x.shape[0], dtype=x.dtype)
    total = training.step_count(ones, cfg)
    out = []
    for step, opt in training.adam_steps(model, x, ones, seed, schedule, cfg):
        if step % every == 0 or step == total:
            out.append(_snapshot(step, model, opt, optimizer_state))
    return out


def _snapshot(
    step: int, model: nn.Module, opt: torch.optim.Optimizer, optimizer_state: bool
) -> Checkpoint:
    """The model's state (and Adam's moments per parameter name when asked)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    group = opt.param_groups[0]
    lr = float(group["lr"])
    if not optimizer_state or "betas" not in group:  # SGD keeps no moments
        return Checkpoint(step=step, state=state, lr=lr)
    moments = {n: opt.state[p] for n, p in model.named_parameters() if "exp_avg_sq" in opt.state[p]}
    return Checkpoint(
        step=step,
        state=state,
        lr=lr,
        exp_avg={n: s["exp_avg"].detach().clone() for n, s in moments.items()},
        exp_avg_sq={n: s["exp_avg_sq"].detach().clone() for n, s in moments.items()},
        betas=(float(group["betas"][0]), float(group["betas"][1])),
        eps=float(group["eps"]),
    )
