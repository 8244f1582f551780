"""Training checkpoints (:meth:`attribution_core.Task.checkpoints`) for the supervised tasks.

Both tasks train through one step generator that :meth:`train` and :meth:`checkpoints` share,
so the replayed final state is the trained model bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from attribution_core import Checkpoint, ConfigError


def check_every(every: int) -> None:
    """Refuse ``every < 1``."""
    if int(every) < 1:
        raise ConfigError(f"every: {every} < 1; keep a checkpoint every ≥ 1 training steps")


def keep(step: int, every: int, total: int) -> bool:
    """Whether the state after ``step`` (1-based) of ``total`` is a checkpoint."""
    return step % every == 0 or step == total


def snapshot(
    step: int, model: nn.Module, lr: float, optimizer: torch.optim.Optimizer | None = None
) -> Checkpoint:
    """A :class:`Checkpoint` of ``model`` (and of an Adam ``optimizer``'s moments if given)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if optimizer is None:
        return Checkpoint(step=step, state=state, lr=float(lr))
    group = optimizer.param_groups[0]
    names = {id(p): n for n, p in model.named_parameters()}
    moments = [
        (names[id(p)], optimizer.state[p])
        for p in _params(optimizer.param_groups)
        if "exp_avg_sq" in optimizer.state[p]  # parameters that never had a gradient: none
    ]
    return Checkpoint(
        step=step,
        state=state,
        lr=float(lr),
        exp_avg={n: s["exp_avg"].detach().clone() for n, s in moments},
        exp_avg_sq={n: s["exp_avg_sq"].detach().clone() for n, s in moments},
        betas=tuple(float(b) for b in group["betas"]),  # type: ignore[arg-type]
        eps=float(group["eps"]),
    )


def _params(groups: Iterable[dict]) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]
