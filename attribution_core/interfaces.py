"""The four interfaces (plus Task) that every attribution method is composed of.

Conventions (see ``docs/concepts.md``; they hold for every plugin):

* ``scores: (n_train, n_query)`` — a large **positive** score means *removing* training
  example ``j`` **raises** the target measurement on query ``q``.  Targets are loss-oriented
  (lower = the model gives the query more probability), so positive = "x_j helped produce x'".
* Influence (paper eq. 6): ``score_j = ∇m(θ, x')ᵀ H⁻¹ ∇ℓ(θ, x_j)``; removing a set ``S`` predicts
  ``m(θ_{D∖S}) − m(θ_D) ≈ (1/N) Σ_{j∈S} score_j``.
* ``H`` is the Hessian (or GGN) of ``L_D(θ) = (1/N) Σ_j ℓ(θ, x_j)`` (+ the task's regulariser) in
  the task's own units; ``damping`` λ is absolute and means ``(H + λI)⁻¹`` exactly.
* A *batch* is a ``dict[str, Tensor]`` whose tensors share a leading dimension ``B``.
* Monte-Carlo *noise* is drawn once, outside any autograd/vmap transform, by
  :meth:`Measurement.draw`, and passed explicitly to :meth:`Measurement.evaluate`: the same seed
  gives the same draws for every model and every method (common random numbers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from attribution_core.batches import Batch, Forward, batch_size, index_batch
from attribution_core.records import (
    CurvatureProblem,
    FitInputs,
    MemorySink,
    MethodParts,
    Phase,
    PlanSizes,
    ScoreSink,
    ScoringContext,
    SinkFactory,
)

__all__ = [
    "Batch",
    "Checkpoint",
    "Curvature",
    "CurvatureProblem",
    "Executor",
    "FitInputs",
    "Forward",
    "GradientCompressor",
    "HessianApproximation",
    "Measurement",
    "MemorySink",
    "MethodParts",
    "Phase",
    "PlanSizes",
    "ScoreSink",
    "Scorer",
    "ScoringContext",
    "SinkFactory",
    "Task",
    "batch_size",
    "index_batch",
]


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
@dataclass(frozen=True)
class Checkpoint:
    """One state of the base model's training run, as :meth:`Task.checkpoints` replays it.

    Attributes:
        step: optimiser steps taken so far (``1..T``); also Adam's step count ``t``.
        state: ``model.state_dict()`` after ``step`` steps (detached copies), loadable into
            ``task.build_model(seed)``.
        lr: ``η_k``, the learning rate in force at this checkpoint (TracInCP's weight).
        exp_avg: Adam's first moment ``m_t`` per parameter name, or None (not asked / not Adam).
        exp_avg_sq: Adam's second moment ``v_t`` per parameter name, or None.
        betas: Adam's ``(β₁, β₂)`` (meaningful only with moments).
        eps: Adam's ``ε`` (meaningful only with moments).
    """

    step: int
    state: Mapping[str, Tensor]
    lr: float
    exp_avg: Mapping[str, Tensor] | None = None
    exp_avg_sq: Mapping[str, Tensor] | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


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


# --------------------------------------------------------------------------------------------
# Curvature
# --------------------------------------------------------------------------------------------
class Curvature(ABC):
    """A fitted (damped) curvature: ``solve(G) = (H + λI)⁻¹ G``."""

    @abstractmethod
    def solve(self, gradients: Tensor) -> Tensor:
        """``(n, p) -> (n, p)``: apply the damped inverse to each row (``p`` = its space's dim)."""

    def describe(self) -> dict[str, Any]:
        """JSON-able facts about the fit (damping used, excluded layers, ...)."""
        return {}


class HessianApproximation(ABC):
    """Fits a :class:`Curvature` of the training objective.

    Attributes:
        name: registry name.
        space: ``"parameter"`` (K-FAC, dense, identity: ``solve`` acts on parameter gradients)
            or ``"compressed"`` (TRAK's projected Fisher: acts on compressed gradients).
    """

    name: ClassVar[str] = "hessian"
    space: ClassVar[Literal["parameter", "compressed"]] = "parameter"

    @abstractmethod
    def fit(self, inputs: FitInputs) -> Curvature:
        """Fit the (damped) curvature at ``inputs.model``'s parameters.

        Args:
            inputs: the model, task, functions, seed and gradient stream (see :class:`FitInputs`).

        Returns:
            A :class:`Curvature` whose ``solve`` acts in this approximation's ``space``.
        """

    def describe(self) -> dict[str, Any]:
        """JSON-able facts about the approximation before fitting (recorded in plans)."""
        return {"name": self.name, "space": self.space}

    def plan(self, sizes: PlanSizes) -> Phase:
        """The ``fit`` phase for ``sizes``, without fitting (used by ``--dry-run``).

        Default: parameter space — one batched forward+backward pass over the training set,
        its own arrays not estimated; compressed space — one pass of per-example training
        gradients. Approximations that know their memory (dense ``p×p``) override it.
        """
        if self.space == "compressed":
            return Phase("fit", sizes.n_train, (), 0, f"fit {self.name!r} on training gradients")
        note = f"fit {self.name!r} (its arrays not estimated)"
        return Phase("fit", sizes.n_train, (), 0, note, cost="batched")


# --------------------------------------------------------------------------------------------
# GradientCompressor
# --------------------------------------------------------------------------------------------
class GradientCompressor(ABC):
    """Maps gradients ``(n, p) -> (n, k)`` (``k = p`` for dequantised int8 and ``none``).

    Attributes:
        name: registry name.
        sketch: True for compressors that map into a smaller space and must therefore be
            applied to **both** sides of an inner product (random projections: the training
            gradients become ``Φᵀ g_j``); False for compressors that only perturb the query side
            (``none``, ``int8``: the training gradients stay ``g_j``).
    """

    name: ClassVar[str] = "compressor"
    sketch: ClassVar[bool] = False

    def fit(self, n_params: int, seed: int, *, layout: Sequence[tuple[str, int]] = ()) -> None:  # noqa: B027
        """Prepare for ``p = n_params`` inputs; ``layout`` lists ``(tensor name, numel)`` in order.

        Default: nothing to prepare.
        """

    @abstractmethod
    def compress(self, gradients: Tensor) -> Tensor:
        """``(n, p) -> (n, k)``."""

    def plan_bytes(self, n_params: int, itemsize: int) -> int:
        """Bytes the compressor holds while compressing ``p = n_params`` inputs (for plans;
        nothing is fitted). Default 0: no state of its own (``none``, ``int8``)."""
        return 0

    def preferred_rows(self) -> int:
        """Rows per ``compress`` call below which it costs more per row (call after ``fit``).

        The training pass groups gradient chunks up to this many rows before compressing
        (a dense projection's GEMM amortises its matrix over the rows). Default 0: any chunk.
        """
        return 0

    def describe(self) -> dict[str, Any]:
        """JSON-able facts (resolved projector type, dims) recorded in the manifest."""
        return {"name": self.name}


# --------------------------------------------------------------------------------------------
# Scorer
# --------------------------------------------------------------------------------------------
class Scorer(ABC):
    """Produces ``scores: (n_train, n_query)`` and predicts subset retraining from them.

    A scorer is built by its registered factory as ``factory(parts: MethodParts, **options)``.

    Attributes:
        uses_oracle: True for retraining oracles whose subset predictions are models trained
            on each mask; the harness then passes the suite's stored ``oracle`` predictions.
        accepts: which components the scorer composes (``"hessian"``, ``"compressor"``); a
            method giving it any other component fails before work.
        gradient_based: True when the scores are functions of one trained model's gradients,
            so that ``ensemble: {models: M}`` may average them over independently trained models.
    """

    name: ClassVar[str] = "scorer"
    uses_oracle: ClassVar[bool] = False
    accepts: ClassVar[frozenset[str]] = frozenset()
    gradient_based: ClassVar[bool] = False

    @abstractmethod
    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` scores under the sign convention of this module."""

    def plan(self, sizes: PlanSizes) -> list[Phase]:
        """The phases :meth:`scores` would run for ``sizes``, without running them.

        Default: one phase holding the ``(N, Q)`` scores.
        """
        shape = (sizes.n_train, sizes.n_query)
        return [Phase("scores", sizes.n_train, shape, shape[0] * shape[1] * sizes.itemsize)]

    def predict_subsets(
        self, masks: Tensor, scores: Tensor, *, oracle: Tensor | None = None
    ) -> Tensor:
        """Predicted change of the target when training on kept examples only.

        Args:
            masks: ``(M, N)`` bool, True = kept.
            scores: ``(N, Q)`` from :meth:`scores`.
            oracle: ``(M, Q)`` the suite's retrained-model predictions for these masks, passed
                only to scorers with ``uses_oracle``; the additive default ignores it.

        Returns:
            ``(M, Q)``: additive default ``(1/N) · (~masks) @ scores`` (paper eq. 6).
        """
        if masks.ndim != 2 or masks.shape[1] != scores.shape[0]:
            raise ValueError(
                f"masks mismatch: expected (M, {scores.shape[0]}) for {scores.shape[0]} "
                f"training examples, got {tuple(masks.shape)}."
            )
        removed = (~masks.bool()).to(scores.dtype)
        return removed @ scores / scores.shape[0]


# --------------------------------------------------------------------------------------------
# Executor
# --------------------------------------------------------------------------------------------
class Executor(ABC):
    """Runs independent jobs (retraining ensembles, measurement batches).

    ``fn`` and ``items`` must be picklable for executors that leave the process (Ray).
    """

    name: ClassVar[str] = "executor"

    @abstractmethod
    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        desc: str = "",
        progress: bool = False,
    ) -> Iterator[tuple[int, Any]]:
        """Apply ``fn`` to every item; yield ``(index, result)`` as jobs finish (any order)."""
