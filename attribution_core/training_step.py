"""The training-step hook's records and optimiser maths: one pure step of a task's training.

A task that trains by steps exposes its run as three pieces (see :class:`attribution_core.Task`):

* ``training_recipe() -> TrainingRecipe`` — the step count ``T`` of the base model (all weights
  1), the minibatch size ``B``, the optimiser and the EMA decay;
* ``draw_stream(seed, step) -> StepBatch`` — step ``step``'s minibatch: indices over **all** N
  examples and the task's noise (diffusion: ``t`` and ``ε``), the same whatever the weights;
* ``step_loss(params, batch, weights) -> ()`` — the weighted minibatch loss
  ``Σ_b w_{i_b} ℓ(θ, x_{i_b}) / B (+ R(θ))``: a mean over the batch size ``B``, never divided by
  ``Σ w``, so a zero weight removes an example's term and keeps the denominator.

``Task.train_step(params, optimizer_state, step, batch, weights)`` is then
``optimizer_update(params, ∇ step_loss, optimizer_state, step, recipe)``: a pure function (no
in-place update, no hidden state) that ``torch.func`` can differentiate in ``params``, the
optimiser state and ``weights`` (reverse mode for metagradients, forward mode for checks).
:func:`optimizer_update` reproduces ``torch.optim.Adam`` (CPU, single-tensor path: bias
correction, ε outside the square root) and ``torch.optim.SGD`` (no momentum) bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

Params = Mapping[str, Tensor]
"""``name -> tensor``: a model's trainable parameters (``model.named_parameters()`` order)."""


# ---- recipe options shared by the tasks' option models (one definition, the same docs) -------
OptimizerOption = Annotated[
    Literal["adam", "sgd"],
    Field(description="Training optimiser: adam (torch.optim.Adam) or sgd (plain, no momentum)."),
]
"""``optimizer`` option of a task that trains by steps (default ``"adam"``)."""
AdamEpsOption = Annotated[
    float, Field(gt=0.0, description="Adam's ε (larger: smoother in the training-data weights).")
]
"""``adam_eps`` option (each task states its default; torch's is ``1e-8``)."""
WarmupStepsOption = Annotated[
    int, Field(ge=0, description="Linear learning-rate warm-up over the first steps (0: none).")
]
"""``warmup_steps`` option (default ``0``)."""

DESCRIPTION_BASELINE = {"optimizer": "adam", "adam_eps": 1e-8, "warmup_steps": 0}
"""The recipe a task description *without* recipe keys stands for: descriptions (manifests,
suites, model cache keys) were written before these options existed, with torch's Adam. A task's
default may differ (``ddpm-digits``: ``adam_eps`` 1e-2); descriptions stay relative to this."""


def recipe_description(optimizer: str, adam_eps: float, warmup_steps: int) -> dict[str, object]:
    """The recipe options that differ from :data:`DESCRIPTION_BASELINE`, for ``Task.describe``.

    Two configs describe the same training run exactly when they describe the same recipe, so a
    run recorded before a task's default changed keeps its description and cache keys.
    """
    recipe = {"optimizer": optimizer, "adam_eps": adam_eps, "warmup_steps": warmup_steps}
    return {k: v for k, v in recipe.items() if v != DESCRIPTION_BASELINE[k]}


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimiser of a training run.

    Attributes:
        kind: ``"adam"`` (``torch.optim.Adam`` semantics) or ``"sgd"`` (plain, no momentum).
        lr: learning rate ``η`` (after the warm-up; see :meth:`lr_at`).
        betas: Adam's ``(β₁, β₂)``.
        eps: Adam's ``ε``, added *outside* the square root: ``√(v̂) + ε``.
        warmup_steps: linear learning-rate warm-up over the first ``W`` steps (0: none).
    """

    kind: Literal["adam", "sgd"]
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("adam", "sgd"):
            raise ValueError(f"optimizer kind: expected 'adam' or 'sgd', got {self.kind!r}.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps mismatch: expected ≥ 0, got {self.warmup_steps}.")

    def lr_at(self, step: int) -> float:
        """``η_t = η · min(1, t / W)`` for the 1-based step ``t`` (``η`` itself when ``W = 0``).

        Training loops that use ``torch.optim`` set their group's ``lr`` to this value before
        step ``t``, so they and :func:`optimizer_update` use the same float.
        """
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.lr
        return self.lr * (int(step) / self.warmup_steps)


@dataclass(frozen=True)
class TrainingRecipe:
    """What replaying a task's training needs besides its draws and loss.

    Attributes:
        steps: ``T``, the optimiser steps of the base model (every weight 1); single-model
            retrainings take exactly this many steps whatever their weights.
        batch_size: ``B``, slots per minibatch (the loss denominator).
        optimizer: the optimiser.
        ema_decay: decay of an exponential moving average of the parameters, or None; with an
            EMA the trained model *is* the EMA (``ema ← lerp(ema, θ, 1 − decay)`` after each step,
            started at the initial parameters).
    """

    steps: int
    batch_size: int
    optimizer: OptimizerConfig
    ema_decay: float | None = None


@dataclass(frozen=True)
class StepBatch:
    """One step's minibatch, as :meth:`Task.draw_stream` gives it (independent of the weights).

    Attributes:
        indices: ``(B,)`` int64 training-example indices in ``0..N-1`` (with replacement); a
            removed example keeps its slots (its weight makes its term vanish).
        noise: the task's per-slot noise, each tensor with leading dimension ``B`` (diffusion:
            ``{"t": (B,) int64 in 1..T, "eps": (B, C, H, W)}``; supervised tasks: ``{}``).
    """

    indices: Tensor
    noise: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerState:
    """The optimiser's state after some steps (read-only; :func:`optimizer_update` returns new).

    Attributes:
        exp_avg: Adam's first moment ``m`` per parameter name (empty for SGD).
        exp_avg_sq: Adam's second moment ``v`` per parameter name (empty for SGD).
        ema: the EMA of the parameters per name, or None (no EMA).
    """

    exp_avg: Mapping[str, Tensor] = field(default_factory=dict)
    exp_avg_sq: Mapping[str, Tensor] = field(default_factory=dict)
    ema: Mapping[str, Tensor] | None = None

    def tree(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """The state as a ``torch.func`` pytree ``(exp_avg, exp_avg_sq, ema or {})``."""
        return dict(self.exp_avg), dict(self.exp_avg_sq), dict(self.ema or {})

    @classmethod
    def from_tree(
        cls, tree: tuple[Mapping[str, Tensor], Mapping[str, Tensor], Mapping[str, Tensor]]
    ) -> OptimizerState:
        """Inverse of :meth:`tree` (an empty EMA dict means no EMA)."""
        exp_avg, exp_avg_sq, ema = tree
        return cls(dict(exp_avg), dict(exp_avg_sq), dict(ema) if ema else None)


def init_optimizer_state(params: Params, recipe: TrainingRecipe) -> OptimizerState:
    """The state before step 1: zero Adam moments (as ``torch.optim.Adam``), EMA = ``params``."""
    adam = recipe.optimizer.kind == "adam"
    zeros = {k: torch.zeros_like(p) for k, p in params.items()} if adam else {}
    ema = {k: p.detach().clone() for k, p in params.items()} if recipe.ema_decay else None
    return OptimizerState(zeros, {k: v.clone() for k, v in zeros.items()}, ema)


def safe_sqrt(v: Tensor) -> Tensor:
    """``√v`` for ``v ≥ 0`` with derivative 0 (not ∞) where ``v = 0`` (same forward bits).

    Adam's ``v`` is exactly 0 for a parameter that has had no gradient yet; the plain square
    root's infinite derivative there would turn ``0 · ∞`` into NaN when differentiating.
    """
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), 0.0)


def optimizer_update(
    params: Params,
    grads: Params,
    state: OptimizerState,
    step: int,
    recipe: TrainingRecipe,
) -> tuple[dict[str, Tensor], OptimizerState]:
    """One optimiser step, out of place: ``(params, state) -> (params', state')``.

    Adam (``torch.optim.Adam``, CPU single-tensor path, op for op)::

        m ← lerp(m, g, 1 − β₁);  v ← β₂ v + (1 − β₂) g²
        θ ← θ − (η / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)

    SGD: ``θ ← θ − η g``. ``η`` is the step's warm-up learning rate
    (:meth:`OptimizerConfig.lr_at`). With an EMA: ``ema ← lerp(ema, θ', 1 − decay)``.

    Args:
        params: ``θ`` before the step, ``name -> tensor``.
        grads: ``∇ step_loss`` at ``θ``, same names and shapes.
        state: the optimiser state before the step.
        step: ``t``, 1-based (Adam's bias correction).
        recipe: the optimiser and EMA settings.

    Returns:
        ``(θ', state')`` as new tensors (inputs are never modified).
    """
    opt = recipe.optimizer
    lr = opt.lr_at(step)
    if opt.kind == "sgd":
        new = {k: torch.add(p, grads[k], alpha=-lr) for k, p in params.items()}
        exp_avg, exp_avg_sq = dict(state.exp_avg), dict(state.exp_avg_sq)
    else:
        beta1, beta2 = opt.betas
        step_size = lr / (1 - beta1 ** float(step))
        bias2_sqrt = (1 - beta2 ** float(step)) ** 0.5
        new, exp_avg, exp_avg_sq = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            exp_avg[k] = torch.lerp(state.exp_avg[k], g, 1 - beta1)
            exp_avg_sq[k] = torch.addcmul(state.exp_avg_sq[k] * beta2, g, g, value=1 - beta2)
            denom = safe_sqrt(exp_avg_sq[k]) / bias2_sqrt + opt.eps
            new[k] = torch.addcdiv(p, exp_avg[k], denom, value=-step_size)
    ema = None
    if state.ema is not None and recipe.ema_decay:
        ema = {k: torch.lerp(e, new[k], 1.0 - recipe.ema_decay) for k, e in state.ema.items()}
    return new, OptimizerState(exp_avg, exp_avg_sq, ema)


def _functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jvp, vmap) is running around us."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return True if peek is None else peek() is not None


def step_gradients(
    loss: Callable[[Params, StepBatch, Tensor], Tensor],
    params: Params,
    batch: StepBatch,
    weights: Tensor,
) -> dict[str, Tensor]:
    """``∇_θ loss(θ, batch, weights)`` by name, the way each caller needs it.

    * Inside a ``torch.func`` transform (metagradients, forward-mode checks):
      ``torch.func.grad``, which composes with ``vjp``/``jvp``/``vmap``.
    * Plain autograd with ``params`` or ``weights`` requiring grad: ``torch.autograd.grad`` with
      ``create_graph=True`` (differentiable by ``backward``).
    * Otherwise (replaying training): ``torch.autograd.grad`` on detached leaves — the same
      kernels as ``loss.backward()``, so a replay equals ``Task.train`` bit for bit.
      (``torch.func.grad`` decomposes some backward kernels, e.g. ``GroupNorm``'s, and differs
      from them in the last bits.)
    """
    if _functorch_active():
        return torch.func.grad(loss)(params, batch, weights)
    create = weights.requires_grad or any(p.requires_grad for p in params.values())
    if create:
        leaves = dict(params)
        if not all(p.requires_grad for p in leaves.values()):
            raise ValueError("params mismatch: expected every parameter to require grad, or none.")
    else:
        leaves = {k: p.detach().requires_grad_() for k, p in params.items()}
    with torch.enable_grad():
        value = loss(leaves, batch, weights)
        grads = torch.autograd.grad(value, list(leaves.values()), create_graph=create)
    return {k: g for k, g in zip(leaves, grads, strict=True)}


class DrawStreams:
    """Random access ``(seed, step) -> StepBatch`` into per-seed sequential draw streams.

    A task's training draws step after step from one CPU generator seeded by the seed, so step
    ``k``'s draws depend on steps ``1..k-1`` having been drawn. This keeps, per seed, the
    generator and its state every ``stride`` steps: walking forward costs one draw per step;
    jumping back replays at most ``stride − 1`` steps from the nearest saved state.

    Args:
        draw: ``(generator, step) -> StepBatch``, consuming the generator exactly as the task's
            training loop does for that step.
        stride: steps between saved generator states (≈ 5 kB each for the CPU generator).
        max_seeds: streams kept at once (least recently used dropped first).
    """

    def __init__(
        self,
        draw: Callable[[torch.Generator, int], StepBatch],
        *,
        stride: int = 32,
        max_seeds: int = 4,
    ) -> None:
        self._draw, self._stride, self._max = draw, int(stride), int(max_seeds)
        self._streams: dict[int, _Cursor] = {}

    def __call__(self, seed: int, step: int) -> StepBatch:
        """Step ``step`` (1-based) of the stream seeded by ``seed``."""
        if int(step) < 1:
            raise ValueError(f"step mismatch: expected a 1-based step ≥ 1, got {step}.")
        seed = int(seed)
        cursor = self._streams.pop(seed, None) or _Cursor(seed)
        self._streams[seed] = cursor  # most recently used last
        while len(self._streams) > self._max:
            self._streams.pop(next(iter(self._streams)))
        return cursor.at(int(step), self._draw, self._stride)


class _Cursor:
    """One seed's generator, positioned before step ``next``, with saved states."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.next = 1
        self.saved = {1: self.gen.get_state()}

    def at(self, step: int, draw: Callable[[torch.Generator, int], StepBatch], stride: int):
        if step < self.next:
            start = max(s for s in self.saved if s <= step)
            self.gen.set_state(self.saved[start])
            self.next = start
        while True:
            batch = draw(self.gen, self.next)
            self.next += 1
            if (self.next - 1) % stride == 0 and self.next not in self.saved:
                self.saved[self.next] = self.gen.get_state()
            if self.next > step:
                return batch
