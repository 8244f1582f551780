"""Training replayed through a task's training-step hook: single-model retraining and unrolling.

*Single-model* retraining (issue 17) answers "what did **this** model learn from x_j": every
retraining starts from the base model's initialisation (``build_model(seed)``), replays the base
model's **whole** draw stream (``draw_stream(seed, 1..T)`` over all N examples) for the base
model's step count ``T``, and changes only the per-example weights — a removed example keeps
its minibatch slots with weight ``removed_weight`` (0 by default), the loss keeps dividing by
the batch size ``B``. With every weight 1 this *is* the base model's training.

Everything here is built on :meth:`Task.train_step` and :meth:`Task.draw_stream`, the same
functions the metagradient differentiates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from attribution_core.errors import ConfigError
from attribution_core.task import Task
from attribution_core.training_step import (
    OptimizerState,
    Params,
    StepBatch,
    TrainingRecipe,
    init_optimizer_state,
)

TASKS_WITH_TRAINING_STEPS = "ddpm-digits, digits-classifier, linear-regression (solver: gd)"
HOOK_NAMES = "Task.training_recipe, Task.draw_stream and Task.step_loss (or Task.train_step)"

StepCallback = Callable[[int, StepBatch, dict[str, Tensor], OptimizerState], None]
"""``(step, batch, params after the step, state after the step) -> None``."""


def require_training_steps(task: Task, who: str) -> TrainingRecipe:
    """The task's :class:`TrainingRecipe`, or a :class:`ConfigError` naming the missing hook.

    Args:
        task: the task.
        who: what needs the hook, for the message (``"method 'metagradient'"``).

    Raises:
        ConfigError: the task does not implement the training-step hook, or refuses it for its
            options (``linear-regression`` with ``solver: closed-form``).
    """
    missing = [
        name
        for name in ("training_recipe", "draw_stream")
        if getattr(type(task), name) is getattr(Task, name)
    ]
    if type(task).step_loss is Task.step_loss and type(task).train_step is Task.train_step:
        missing.append("step_loss")
    if missing:
        hooks = ", ".join(f"Task.{m}" for m in missing)
        raise ConfigError(
            f"{who}: task {task.name!r} does not implement the training-step hook ({hooks} "
            f"missing; the hook is {HOOK_NAMES}), so its training cannot be replayed step by "
            f"step; tasks with the hook: {TASKS_WITH_TRAINING_STEPS}"
        )
    try:
        return task.training_recipe()
    except NotImplementedError as exc:
        raise ConfigError(f"{who}: {exc}") from None


def recipe_if_replayable(task: Task) -> TrainingRecipe | None:
    """The task's :class:`TrainingRecipe` when it can replay its training step by step, else
    None (for plans, which describe what would run without refusing)."""
    try:
        return require_training_steps(task, "plan")
    except ConfigError:
        return None


def training_state_of(
    model: nn.Module, recipe: TrainingRecipe
) -> tuple[dict[str, Tensor], OptimizerState]:
    """``(params, fresh optimiser state)`` from ``model``'s parameters (detached copies)."""
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    return params, init_optimizer_state(params, recipe)


def initial_training_state(task: Task, seed: int) -> tuple[dict[str, Tensor], OptimizerState]:
    """The state before step 1 of the run from ``seed``: ``build_model(seed)``'s parameters."""
    return training_state_of(task.build_model(int(seed)), task.training_recipe())


def unroll_training(
    task: Task,
    params: Params,
    state: OptimizerState,
    weights: Tensor,
    seed: int,
    steps: range,
    on_step: StepCallback | None = None,
) -> tuple[dict[str, Tensor], OptimizerState]:
    """Apply ``task.train_step`` for each step in ``steps`` (1-based, increasing).

    Differentiable when the inputs require grad (or under ``torch.func`` transforms); callers
    that only replay wrap it in ``torch.no_grad()``.

    Returns:
        ``(params, state)`` after the last step of ``steps``.
    """
    p, s = dict(params), state
    for step in steps:
        batch = task.draw_stream(int(seed), step)
        p, s = task.train_step(p, s, step, batch, weights)
        if on_step is not None:
            on_step(step, batch, p, s)
    return p, s


def final_parameters(params: Params, state: OptimizerState) -> dict[str, Tensor]:
    """The trained model's parameters: the EMA when the run keeps one, else ``params``."""
    return dict(state.ema) if state.ema is not None else dict(params)


def load_parameters(model: nn.Module, params: Params) -> nn.Module:
    """Copy ``params`` into ``model``'s parameters of the same names (cast to their dtype)."""
    named = dict(model.named_parameters())
    missing = sorted(set(named) - set(params))
    if missing:
        raise ValueError(f"parameters mismatch: expected {sorted(named)}, missing {missing}.")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(params[k])
    return model


def single_model_weights(kept: Tensor, removed_weight: float = 0.0) -> Tensor:
    """``(…, N)`` weights from a keep mask: 1 where kept, ``removed_weight`` where removed."""
    kept = kept.bool()
    out = torch.full(kept.shape, float(removed_weight), dtype=torch.float64)
    return out.masked_fill(kept, 1.0)


def train_single_model(
    task: Task,
    weights: Tensor,
    seed: int,
    *,
    on_step: StepCallback | None = None,
    stream_seed: int | None = None,
) -> nn.Module:
    """The single-model retraining with per-example ``weights: (N,)`` (see module docstring).

    Args:
        task: a task with the training-step hook.
        weights: ``(N,)`` per-example weights (1 = kept; :func:`single_model_weights` builds
            them from a keep mask and ``removed_weight``).
        seed: the base model's seed (initialisation and the whole draw stream).
        on_step: called after every step (e.g. to log the draw stream).
        stream_seed: seed of the draw stream (minibatch indices and the task's noise) when it
            differs from the initialisation's (cross-seed transfer, scope ``stream``: same
            initialisation, other data order and noise); None = ``seed``. ``build_model`` and
            ``draw_stream`` are seeded independently, so this changes nothing else.

    Returns:
        ``build_model(seed)`` holding the trained (EMA, when kept) parameters, in eval mode.

    Raises:
        ConfigError: the task has no training-step hook (names it).
    """
    recipe = require_training_steps(task, "single-model training")
    n = task.n_train
    if weights.shape != (n,):
        raise ValueError(f"weights mismatch: expected ({n},), got {tuple(weights.shape)}.")
    model = task.build_model(int(seed))
    params, state = training_state_of(model, recipe)
    w = weights.detach().to(task.device, task.dtype)
    with torch.no_grad():
        stream = int(seed if stream_seed is None else stream_seed)
        params, state = unroll_training(
            task, params, state, w, stream, range(1, recipe.steps + 1), on_step
        )
    return load_parameters(model, final_parameters(params, state)).eval()
