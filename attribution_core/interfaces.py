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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from attribution_core.batches import Batch, Forward, batch_size, index_batch
from attribution_core.records import (
    Checkpoint,
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
from attribution_core.task import Measurement, Task
from attribution_core.training_step import (
    OptimizerConfig,
    OptimizerState,
    StepBatch,
    TrainingRecipe,
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
    "OptimizerConfig",
    "OptimizerState",
    "Phase",
    "PlanSizes",
    "ScoreSink",
    "Scorer",
    "ScoringContext",
    "SinkFactory",
    "StepBatch",
    "Task",
    "TrainingRecipe",
    "batch_size",
    "index_batch",
]


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
        self,
        masks: Tensor,
        scores: Tensor,
        *,
        oracle: Tensor | None = None,
        removed_weight: float = 0.0,
    ) -> Tensor:
        """Predicted change of the target when training on kept examples only.

        Args:
            masks: ``(M, N)`` bool, True = kept.
            scores: ``(N, Q)`` from :meth:`scores`.
            oracle: ``(M, Q)`` the suite's retrained-model predictions for these masks, passed
                only to scorers with ``uses_oracle``; the additive default ignores it.
            removed_weight: ``r``, the weight the "removed" examples keep (0 = removal). To first
                order, down-weighting by ``1 − r`` moves the target ``1 − r`` times as far as
                removing; the harness passes it only when ``r ≠ 0`` (overrides written before it
                existed keep working on removal suites).

        Returns:
            ``(M, Q)``: additive default ``(1 − r) · (1/N) · (~masks) @ scores`` (paper eq. 6).
        """
        if masks.ndim != 2 or masks.shape[1] != scores.shape[0]:
            raise ValueError(
                f"masks mismatch: expected (M, {scores.shape[0]}) for {scores.shape[0]} "
                f"training examples, got {tuple(masks.shape)}."
            )
        removed = (~masks.bool()).to(scores.dtype)
        pred = removed @ scores / scores.shape[0]
        return pred if removed_weight == 0 else pred * (1.0 - float(removed_weight))


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
