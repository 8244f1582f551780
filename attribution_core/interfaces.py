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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

Batch = dict[str, Tensor]
"""Named tensors sharing a leading batch dimension ``B``."""

Forward = Callable[..., Tensor]
"""The network's forward function (``model(*args)`` or a ``functional_call`` of it)."""


def batch_size(batch: Mapping[str, Tensor]) -> int:
    """Leading dimension shared by every tensor of ``batch``.

    Raises:
        ValueError: if the batch is empty or its tensors disagree on the leading dimension.
    """
    sizes = {k: v.shape[0] for k, v in batch.items()}
    if not sizes:
        raise ValueError("batch mismatch: expected at least one tensor, got an empty batch.")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch mismatch: expected one leading dimension, got {sizes}.")
    return next(iter(sizes.values()))


def index_batch(batch: Mapping[str, Tensor], index: Any) -> Batch:
    """``{k: v[index]}`` for every tensor of ``batch`` (slices, index tensors, masks)."""
    return {k: v[index] for k, v in batch.items()}


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
@dataclass
class CurvatureProblem:
    """What curvature back-ends (K-FAC, GGN-CG) need to see the task as ``loss(f(x), y)``.

    ``H = scale · GGN`` of ``Σ_batches loss_function(model(inputs), targets)`` (+ the task's
    regulariser) must equal the Hessian/GGN of ``L_D`` in the task's units.

    Attributes:
        model: maps ``inputs`` to **2-D** outputs ``(B, k)`` and shares parameters with the task
            model (a thin wrapper, never a copy).
        loss_function: ``nn.MSELoss(reduction="sum")`` or ``nn.CrossEntropyLoss(reduction="sum")``.
        batches: ``batches(pass_index) -> iterable of (inputs, targets)``; each pass draws fresh
            Monte-Carlo noise from a generator seeded by ``(seed, pass_index)``.
        scale: multiplies the GGN of the summed loss (e.g. ``1/(N·S)``).
        batch_size_fn: for dict inputs, returns the batch size of ``inputs``.
        n_rows: number of rows (loss terms) in one pass.
    """

    model: nn.Module
    loss_function: nn.Module
    batches: Callable[[int], Iterable[tuple[Any, Tensor]]]
    scale: float
    batch_size_fn: Callable[[Any], int] | None = None
    n_rows: int = 0


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


GradientSource = Callable[[], Iterator[tuple[slice, Tensor]]]
"""Yields ``(rows, G)`` chunks of training gradients in a curvature's own space."""


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
    def fit(
        self,
        model: nn.Module,
        task: Task,
        train_measurement: Measurement,
        seed: int,
        *,
        params: Mapping[str, Tensor],
        train_gradients: GradientSource,
        cache_dir: str | None = None,
        progress: bool = False,
    ) -> Curvature:
        """Fit the curvature at ``model``'s parameters.

        Args:
            model: the trained model (eval mode).
            task: its task (data, curvature hooks, regulariser).
            train_measurement: the method's ``train_function``.
            seed: seed for every random choice of the fit (MC targets, noise).
            params: the included parameters, ``name -> tensor`` (the parameter space's order).
            train_gradients: training gradients in this approximation's ``space`` (used by
                empirical / projected Fisher fits; others may ignore it).
            cache_dir: where fitted factors may be cached (None = no caching).
            progress: show progress bars.
        """


# --------------------------------------------------------------------------------------------
# GradientCompressor
# --------------------------------------------------------------------------------------------
class GradientCompressor(ABC):
    """Maps gradients ``(n, p) -> (n, k)`` (``k = p`` for dequantised int8 and ``none``)."""

    name: ClassVar[str] = "compressor"

    def fit(self, n_params: int, seed: int, *, layout: Sequence[tuple[str, int]] = ()) -> None:  # noqa: B027
        """Prepare for ``p = n_params`` inputs; ``layout`` lists ``(tensor name, numel)`` in order.

        Default: nothing to prepare.
        """

    @abstractmethod
    def compress(self, gradients: Tensor) -> Tensor:
        """``(n, p) -> (n, k)``."""

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
@dataclass
class ScoringContext:
    """Everything a scorer may use besides the task, model and queries.

    Attributes:
        seed: the method's seed (MC draws of gradients, projections).
        target: the run's target measurement.
        cache_dir: where scorers may cache reusable work (gradients, factors); None = no cache.
        chunk_size: training examples per gradient chunk.
        progress: show progress bars.
        executor: runs independent jobs (retraining) locally or on Ray.
        timings: phase name -> seconds; scorers add their phases here.
        info: free-form JSON-able facts recorded in the manifest.
    """

    seed: int
    target: Measurement
    cache_dir: Any = None
    chunk_size: int = 64
    progress: bool = False
    executor: Executor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class Scorer(ABC):
    """Produces ``scores: (n_train, n_query)`` and predicts subset retraining from them.

    Attributes:
        uses_oracle: True for retraining oracles whose subset predictions are models trained
            on each mask; the harness then passes the suite's stored ``oracle`` predictions.
    """

    name: ClassVar[str] = "scorer"
    uses_oracle: ClassVar[bool] = False

    @abstractmethod
    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` scores under the sign convention of this module."""

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
