"""Reverse-mode differentiation through a task's training run by checkpointed replay.

For the run ``(θ_t, s_t) = step_t(θ_{t−1}, s_{t−1}; w)``, ``t = 1..T`` (the task's pure
``train_step`` on its draw ``draw_stream(seed, t)``; ``s`` = Adam moments and EMA) and a query
measurement ``m_q(θ_T)`` (the EMA when the run keeps one), the adjoint recursion is::

    λ_T = ∂m_q/∂(θ_T, s_T);   ∂m_q/∂w += λ_tᵀ ∂step_t/∂w;   λ_{t−1} = λ_tᵀ ∂step_t/∂(θ_{t−1}, s_{t−1})

One vector–Jacobian product of ``train_step`` per step (``torch.func.vjp``, which differentiates
through the step's own gradient: a Hessian–vector product). The ``Q_b`` queries of a block share
each step's linearisation: their adjoints are a leading dimension that ``torch.func.vmap`` maps
the VJP over.

Memory (REPLAY-style checkpointing): a forward pass keeps ``(θ, s)`` every ``k`` steps; the
reverse pass walks the segments backwards, recomputes each segment's ``k`` states forward from
its checkpoint, then differentiates its steps in reverse. States held: ``⌈T/k⌉ + k`` (``k ≈ √T``
minimises it); compute: two forward runs plus ``T`` VJPs per query block. The replay is
deterministic, so every ``k`` gives the same bits as storing every state (``k = 1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vjp, vmap

from attribution_core import (
    OptimizerState,
    Task,
    final_parameters,
    initial_training_state,
    progress_bar,
    unroll_training,
)

QueryGradients = Callable[[dict[str, Tensor], slice], dict[str, Tensor]]
"""``(final parameters, query rows) -> ∂m_q/∂θ by name, each (Q_b, *shape)``."""

State = tuple[dict[str, Tensor], OptimizerState]


@dataclass(frozen=True)
class ReplayPlan:
    """The checkpoint layout of one reverse pass.

    Attributes:
        steps: ``T``.
        every: ``k``, steps between kept states (the state before step 1 is always kept).
        query_batch: queries per reverse block.
    """

    steps: int
    every: int
    query_batch: int

    @property
    def starts(self) -> list[int]:
        """Segment starts ``0, k, 2k, …`` below ``T`` (a segment is steps ``start+1..start+k``)."""
        return list(range(0, self.steps, self.every))

    def states_held(self) -> int:
        """Peak number of ``(θ, s)`` states in memory: checkpoints plus one segment."""
        return len(self.starts) + min(self.every, self.steps)


def default_every(steps: int) -> int:
    """``⌈√T⌉``: the ``k`` that minimises ``⌈T/k⌉ + k`` states held."""
    return max(1, math.ceil(math.sqrt(steps)))


def forward_checkpoints(
    task: Task, seed: int, weights: Tensor, plan: ReplayPlan, start: State
) -> tuple[dict[int, State], State]:
    """Run all ``T`` steps without autograd; keep the state at every segment start.

    Returns:
        ``({segment start: state before its first step}, final state)``.
    """
    kept: dict[int, State] = {}
    params, state = start
    with torch.no_grad():
        for first in plan.starts:
            kept[first] = (params, state)
            last = min(first + plan.every, plan.steps)
            params, state = unroll_training(
                task, params, state, weights, seed, range(first + 1, last + 1)
            )
    return kept, (params, state)


def weight_gradients(
    task: Task,
    seed: int,
    weights: Tensor,
    query_gradients: QueryGradients,
    n_query: int,
    plan: ReplayPlan,
    *,
    check_final: Callable[[dict[str, Tensor]], None] | None = None,
    progress: bool = False,
) -> Tensor:
    """``(N, Q)``: ``∂m_q(θ_T(w))/∂w_j`` at ``weights`` (see module docstring).

    Args:
        task: a task with the training-step hook.
        seed: the base model's seed (initialisation and draw stream).
        weights: ``(N,)`` the point of differentiation (all ones for attribution).
        query_gradients: ``∂m/∂θ`` at the final parameters for a block of queries.
        n_query: ``Q``.
        plan: ``T``, checkpoint spacing and query block size.
        check_final: called with the final (measured) parameters after the forward pass and
            before any differentiation (the scorer refuses a model that is not this run's).
        progress: show a bar over the ``T`` reverse steps (stderr).
    """
    kept, final = forward_checkpoints(task, seed, weights, plan, initial_training_state(task, seed))
    if check_final is not None:
        check_final(final_parameters(*final))
    blocks = [
        slice(a, min(a + plan.query_batch, n_query)) for a in range(0, n_query, plan.query_batch)
    ]
    adjoints = [
        _final_adjoint(final, query_gradients(final_parameters(*final), rows)) for rows in blocks
    ]
    grads_w = [
        torch.zeros(
            rows.stop - rows.start, weights.shape[0], dtype=weights.dtype, device=weights.device
        )
        for rows in blocks
    ]
    with progress_bar(plan.steps, "metagradient (reverse steps)", progress) as bar:
        for first in reversed(plan.starts):
            last = min(first + plan.every, plan.steps)
            inputs = _segment_inputs(task, seed, weights, kept[first], first, last)
            for step in range(last, first, -1):
                _reverse_step(
                    task, seed, step, inputs[step - first - 1], weights, adjoints, grads_w
                )
                bar.advance()
    return torch.cat(grads_w).T


def _reverse_step(
    task: Task,
    seed: int,
    step: int,
    before: State,
    weights: Tensor,
    adjoints: list[tuple],
    grads_w: list[Tensor],
) -> None:
    """Pull every block's adjoint back through ``step`` (in place), adding ``∂/∂w``."""
    batch = task.draw_stream(seed, step)
    params, state = before

    def one_step(p, tree, w):
        new_p, new_s = task.train_step(p, OptimizerState.from_tree(tree), step, batch, w)
        return new_p, new_s.tree()

    _, pullback = vjp(one_step, params, state.tree(), weights)
    for b, adjoint in enumerate(adjoints):
        d_params, d_tree, d_w = vmap(pullback)(adjoint)
        adjoints[b] = (d_params, d_tree)
        grads_w[b] += d_w


def _segment_inputs(
    task: Task, seed: int, weights: Tensor, start: State, first: int, last: int
) -> list[State]:
    """The states before steps ``first+1 .. last``, recomputed forward from ``start``."""
    out = [start]
    params, state = start
    with torch.no_grad():
        for step in range(first + 1, last):
            params, state = unroll_training(
                task, params, state, weights, seed, range(step, step + 1)
            )
            out.append((params, state))
    return out


def _final_adjoint(final: State, dm: dict[str, Tensor]) -> tuple:
    """``λ_T`` as the pytree ``(params, (exp_avg, exp_avg_sq, ema))`` with leading dim ``Q_b``."""
    params, state = final
    q = next(iter(dm.values())).shape[0]

    def zeros(tree: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            k: torch.zeros((q, *v.shape), dtype=v.dtype, device=v.device) for k, v in tree.items()
        }

    exp_avg, exp_avg_sq, ema = state.tree()
    if state.ema is not None:  # the measured model is the EMA
        return zeros(params), (zeros(exp_avg), zeros(exp_avg_sq), dict(dm))
    return dict(dm), (zeros(exp_avg), zeros(exp_avg_sq), zeros(ema))
