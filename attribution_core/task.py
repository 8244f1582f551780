"""The model-family side of the interfaces: :class:`Measurement` and :class:`Task`.

Re-exported by :mod:`attribution_core.interfaces` (and the package); see that module for the
conventions every plugin follows (sign, units, batches, common random numbers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attribution_core.batches import Batch, Forward, batch_size
from attribution_core.records import Checkpoint, CurvatureProblem
from attribution_core.training_step import (
    OptimizerState,
    Params,
    StepBatch,
    TrainingRecipe,
    optimizer_update,
    step_gradients,
)


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
class Measurement(ABC):
    """A differentiable per-example quantity ``m(θ, x) -> (B,)``.

    Used as the *target* (what LDS predicts), a method's ``query_function`` and its
    ``train_function`` (whose gradient stands for ``∇ℓ(θ, x_j)``).

    Subclasses implement :meth:`evaluate`; Monte-Carlo ones also override :meth:`draw` and set
    ``n_samples``.  ``evaluate`` must be written with batched torch ops only (no ``.item()``, no
    Python branching on values) so that ``torch.func.vmap``/``grad`` can transform it.

    Attributes:
        name: registry name (``"loss"``, ``"timestep-loss"``, ``"mse"``, ...).
        is_target: True for loss-oriented measurements that may be a target; False for
            functions only (D-TRAK's ``square-norm`` etc.).
        n_samples: Monte-Carlo draws per example (1 for deterministic measurements).
    """

    name: ClassVar[str] = "measurement"
    is_target: ClassVar[bool] = True
    n_samples: int = 1

    def draw(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Draw the Monte-Carlo noise for ``batch``.

        Args:
            batch: examples, leading dimension ``B``.
            generator: CPU generator; the only source of randomness.

        Returns:
            Noise tensors with leading dimension ``B`` (then ``n_samples``), on CPU.
            Deterministic measurements return ``{}`` (the default).
        """
        return {}

    @abstractmethod
    def evaluate(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """Evaluate the measurement.

        Args:
            forward: the network's forward function (may be a ``functional_call``).
            batch: examples, leading dimension ``B``.
            noise: output of :meth:`draw` for the same examples (moved to the batch's device).

        Returns:
            ``(B,)`` tensor in the measurement's units (Monte-Carlo ones: mean over draws).
        """

    def __call__(
        self, model: nn.Module, batch: Batch, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw noise from ``generator`` (seed 0 if None) and evaluate on ``model``: ``(B,)``."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        device = next(iter(batch.values())).device
        noise = {k: v.to(device) for k, v in self.draw(batch, gen).items()}
        return self.evaluate(model, batch, noise)

    def describe(self) -> dict[str, Any]:
        """JSON-able description recorded in manifests and cache keys."""
        return {"name": self.name, "n_samples": self.n_samples}


# --------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------
class Task(ABC):
    """A model family and its data.

    Subclasses implement the abstract methods; the rest have documented defaults.

    Attributes:
        name: registry name.
        dtype: floating dtype for models and data (float32, or float64 for exactness tests).
        device: torch device for models and data.
    """

    name: ClassVar[str] = "task"
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    # ---- data ------------------------------------------------------------------------------
    @abstractmethod
    def train_data(self) -> Batch:
        """The training set D as a batch with leading dimension ``N``."""

    @property
    def n_train(self) -> int:
        """``N``, the number of training examples."""
        return batch_size(self.train_data())

    # ---- models ----------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised model (initialisation drawn from ``seed``)."""

    @abstractmethod
    def train(self, model: nn.Module, weights: Tensor, seed: int) -> nn.Module:
        """Train ``model`` on D with per-example ``weights: (N,)`` (0 removes, 0.5 down-weights).

        The objective keeps its ``1/N`` when weights change (paper eq. 4). Returns the trained
        model (may be ``model`` itself), in eval mode.
        """

    def train_ensemble(self, weights: Tensor, seeds: Sequence[int]) -> list[nn.Module]:
        """Train ``M`` models at once: ``weights: (M, N)``, one seed per row.

        Default: a loop over :meth:`train` on fresh models; tasks override it with a batched
        (``torch.func.stack_module_state`` + ``vmap``) implementation.
        """
        if weights.ndim != 2 or weights.shape[0] != len(seeds):
            raise ValueError(
                f"train_ensemble mismatch: expected weights (M, N) with M = len(seeds) = "
                f"{len(seeds)}, got {tuple(weights.shape)}."
            )
        return [self.train(self.build_model(s), w, s) for w, s in zip(weights, seeds, strict=True)]

    def base_model(self, seed: int) -> nn.Module:
        """The model trained on all of D from ``seed`` (tasks may cache it)."""
        model = self.build_model(seed)
        return self.train(model, torch.ones(self.n_train, dtype=self.dtype), seed)

    def checkpoints(
        self, seed: int, every: int, *, optimizer_state: bool = False
    ) -> list[Checkpoint]:
        """Replay :meth:`base_model`'s training from ``seed`` and keep a state every ``every`` steps.

        Optional hook (TracInCP, Pruthi et al. 2020). The replay must be deterministic: its last
        checkpoint is the state after the final step, equal bit for bit to ``base_model(seed)``.

        Args:
            seed: the base model's seed (initialisation and training draws).
            every: keep the state after steps ``every, 2·every, …``; the final step ``T`` is
                always kept (last element), so ``every ≥ T`` gives one checkpoint.
            optimizer_state: also record Adam's moments (:attr:`Checkpoint.exp_avg_sq`, ...).

        Returns:
            Checkpoints in training order, the last one after step ``T``.

        Raises:
            NotImplementedError: by default — the task does not implement the ``checkpoints``
                hook (tasks that do: ``linear-regression`` with ``solver: gd``,
                ``digits-classifier``, ``ddpm-digits``).
        """
        raise NotImplementedError(
            f"task {self.name!r} does not implement the Task.checkpoints hook (replaying its "
            f"base model's training from a seed); methods that need training checkpoints "
            f"(tracin) cannot run on it"
        )

    # ---- training-step hook (optional) -------------------------------------------------------
    def training_recipe(self) -> TrainingRecipe:
        """Step count ``T`` of the base model, batch size ``B``, optimiser and EMA.

        Optional training-step hook (with :meth:`draw_stream` and :meth:`step_loss`): tasks that
        train by steps implement it so that their training can be replayed and differentiated
        (single-model retraining, metagradients).

        Raises:
            NotImplementedError: by default (names the hook).
        """
        raise NotImplementedError(_no_step_hook(self, "training_recipe"))

    def draw_stream(self, seed: int, step: int) -> StepBatch:
        """Step ``step``'s (1-based) minibatch of the run from ``seed``: indices over all N.

        The draws must not depend on the weights (a removed example keeps its slots), and
        ``train(build_model(seed), ones, seed)`` must consume exactly this stream.

        Raises:
            NotImplementedError: by default (names the hook).
        """
        raise NotImplementedError(_no_step_hook(self, "draw_stream"))

    def step_loss(self, params: Params, batch: StepBatch, weights: Tensor) -> Tensor:
        """The weighted minibatch loss ``Σ_b w_{i_b} ℓ(θ, x_{i_b}) / B + R(θ)`` (a scalar).

        It runs under ``torch.func`` transforms: build any module it needs beforehand (e.g. in
        :meth:`training_recipe` and :meth:`draw_stream`, which callers run first), never inside.

        Args:
            params: ``θ``, ``name -> tensor`` (the model's ``named_parameters``).
            batch: the step's draws.
            weights: ``(N,)`` per-example weights (differentiable: never detach them).

        Raises:
            NotImplementedError: by default (names the hook).
        """
        raise NotImplementedError(_no_step_hook(self, "step_loss"))

    def train_step(
        self,
        params: Params,
        optimizer_state: OptimizerState,
        step: int,
        batch: StepBatch,
        weights: Tensor,
    ) -> tuple[dict[str, Tensor], OptimizerState]:
        """One pure optimiser step on :meth:`step_loss`: ``(θ, state) -> (θ', state')``.

        Default: the gradient of :meth:`step_loss` (:func:`~attribution_core.training_step.
        step_gradients`: the ``backward()`` kernels when replaying, ``torch.func.grad`` under
        ``torch.func`` transforms), then
        :func:`attribution_core.training_step.optimizer_update` with :meth:`training_recipe`'s
        optimiser. Differentiable in ``params``, ``optimizer_state`` and ``weights``.
        """
        recipe = self.training_recipe()  # first: tasks build step_loss's module here
        grads = step_gradients(self.step_loss, params, batch, weights)
        return optimizer_update(params, grads, optimizer_state, step, recipe)

    @abstractmethod
    def make_queries(self, model: nn.Module, n: int, seed: int) -> Batch:
        """``n`` query examples (diffusion: samples generated by ``model``, with trajectories)."""

    # ---- measurements ----------------------------------------------------------------------
    l2: float = 0.0
    """``λ`` of the regulariser ``R(θ) = λ‖θ‖²`` over the included parameters (``∇²R = 2λI``);
    curvature back-ends that cannot differentiate ``R`` add ``2λ`` to their damping."""

    @abstractmethod
    def training_loss(self, n_samples: int | None = None) -> Measurement:
        """``ℓ(θ, x)`` — the per-example training loss, in the units of ``L_D``.

        Args:
            n_samples: Monte-Carlo draws per example (None = the task's default).
        """

    def regularizer(self, params: Mapping[str, Tensor]) -> Tensor:
        """``R(θ) = l2 · Σ ‖p‖²`` over ``params`` (the included parameters); 0 by default."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        if self.l2:
            for p in params.values():
                total = total + self.l2 * (p * p).sum()
        return total

    # ---- curvature hooks -------------------------------------------------------------------
    def curvature_problem(self, model: nn.Module, seed: int, n_samples: int) -> CurvatureProblem:
        """The task as ``loss(f(x), y)`` for GGN/K-FAC back-ends (see :class:`CurvatureProblem`).

        Raises:
            NotImplementedError: tasks that do not support curvature back-ends.
        """
        raise NotImplementedError(f"task {self.name!r} does not expose a curvature problem")

    @classmethod
    def full_step_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The task options under which training on a subset takes as many steps as on all of D.

        Harnesses that compare retrainings of different sizes at a fixed step count (the
        counterfactual command) call this on the task's validated options before building the
        retraining task. Default: the options unchanged (the task's step count does not depend
        on the kept fraction). Tasks whose step count scales with ``Σw/N`` override it.
        """
        return dict(options)

    # ---- outputs -----------------------------------------------------------------------------
    def images(self, batch: Batch) -> Tensor | None:
        """``(B, C, H, W)`` images in [0, 1] for reports and similarity baselines, or None."""
        return None

    def describe(self) -> dict[str, Any]:
        """JSON-able description recorded in manifests."""
        return {"name": self.name}


def _no_step_hook(task: Task, method: str) -> str:
    return (
        f"task {task.name!r} does not implement the training-step hook (Task.{method}; the "
        f"hook is Task.training_recipe, Task.draw_stream and Task.step_loss)"
    )
