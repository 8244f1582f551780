"""Read-only records passed between the pipeline and the components of a method.

They are defined apart from the interfaces (:mod:`attribution_core.interfaces`, which re-exports
them) so that each interface takes one record instead of a growing list of arguments: a new
field with a default extends every implementation at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from attribution_core.gradients import GradientStream
    from attribution_core.interfaces import (
        Executor,
        GradientCompressor,
        HessianApproximation,
        Measurement,
        Task,
    )
    from attribution_core.shards import ShardRunner


@dataclass(frozen=True)
class FitInputs:
    """Everything a :class:`HessianApproximation` may use to fit, as one read-only record.

    The interface grows by adding fields here (with defaults), never by editing every ``fit``.

    Attributes:
        model: the trained model (eval mode).
        task: its task (data, curvature hooks, regulariser ``l2``).
        train_function: the method's ``train_function`` (whose gradient stands for ∇ℓ(θ, x_j)).
        seed: seed of every random choice of the fit (MC pseudo-targets, (t, ε) draws).
        params: the included parameters, ``name -> tensor`` (the parameter space's order).
        train_gradients: the training gradients in this approximation's ``space`` — compressed
            rows ``(n, k)`` for ``space = "compressed"``, parameter rows ``(n, p)`` otherwise —
            as a :class:`attribution_core.gradients.GradientStream`. Empirical and projected
            Fisher fits read it; the others ignore it.
        cache_dir: where fitted factors may be cached (None = no caching).
        progress: show progress bars.
        shards: runs data passes shard by shard on the run's executor
            (:class:`attribution_core.shards.ShardRunner`); None = one local pass. A fit that
            shards sums per-shard statistics with ``shards.reduce`` (fixed shard order).
    """

    model: nn.Module
    task: Task
    train_function: Measurement
    seed: int
    params: Mapping[str, Tensor]
    train_gradients: GradientStream | None = None
    cache_dir: str | None = None
    progress: bool = False
    shards: ShardRunner | None = None


class ScoreSink(ABC):
    """Receives ``scores`` row blocks as a scorer computes them.

    Scorers never allocate the ``(n_train, n_query)`` matrix themselves: they open a sink through
    :attr:`ScoringContext.sink` and write row ranges into it, so the pipeline decides where the
    scores go (memory today; a memory-mapped file or a top-k buffer later).
    """

    @abstractmethod
    def write(self, rows: slice, block: Tensor, cols: slice | None = None) -> None:
        """Store ``block`` as those training rows (and query columns ``cols``; None = all).

        ``block: (rows.stop - rows.start, cols.stop - cols.start)``.
        """

    @abstractmethod
    def result(self) -> Tensor:
        """The scores written so far, ``(n_train, n_query)``."""


class MemorySink(ScoreSink):
    """The whole ``(n_train, n_query)`` matrix in memory (the default sink)."""

    def __init__(
        self, n_train: int, n_query: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        self.out = torch.empty(n_train, n_query, dtype=dtype, device=device)

    def write(self, rows: slice, block: Tensor, cols: slice | None = None) -> None:
        """``out[rows, cols] = block``."""
        self.out[rows, cols if cols is not None else slice(None)] = block

    def result(self) -> Tensor:
        """The matrix."""
        return self.out


SinkFactory = Callable[[int, int, torch.dtype, torch.device], ScoreSink]
"""``(n_train, n_query, dtype, device) -> ScoreSink``."""


@dataclass(frozen=True)
class ScoringContext:
    """Everything a scorer may use besides the task, model, queries and its method's parts.

    The method's seed is *not* here: it lives in :class:`MethodParts` only.

    Attributes:
        target: the run's target measurement.
        cache_dir: where scorers may cache reusable work (gradients, factors); None = no cache.
        chunk_size: training examples per gradient chunk.
        progress: show progress bars.
        executor: runs independent jobs (retraining) locally or on Ray.
        sink: opens the :class:`ScoreSink` the scorer writes its rows into.
        shards: runs training passes shard by shard on the executor, resumable
            (:class:`attribution_core.shards.ShardRunner`); None = one local pass.
        query_block: queries per block of raw query gradients (None = all at once); prepared
            blocks share a training pass while they fit 256 MiB
            (:func:`attribution_core.score_pass.score_queries`).
        timings: phase name -> seconds; scorers add their phases here.
        info: free-form JSON-able facts recorded in the manifest.
    """

    target: Measurement
    cache_dir: Any = None
    chunk_size: int = 64
    progress: bool = False
    executor: Executor | None = None
    sink: SinkFactory = MemorySink
    shards: ShardRunner | None = None
    query_block: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodParts:
    """The built components of one method, handed (read-only) to its scorer's factory.

    Attributes:
        label: the method's label (output directory, ``lds.csv`` row).
        seed: seed of every random choice of the method (MC draws, projections) — its only copy.
        train_function: the measurement whose gradient stands for ∇ℓ(θ, x_j).
        query_function: the measurement differentiated on the queries; None = the run's target.
        hessian: the Hessian approximation, or None (influence: identity).
        compressor: the gradient compressor, or None (none).
    """

    label: str
    seed: int
    train_function: Measurement
    query_function: Measurement | None = None
    hessian: HessianApproximation | None = None
    compressor: GradientCompressor | None = None


@dataclass(frozen=True)
class PlanSizes:
    """The sizes a plan is computed for: ``N`` training examples, ``Q`` queries, ``p`` params,
    and ``train_steps`` = ``T``, the optimiser steps of one training run by the task's
    training-step hook (0 when the task has none)."""

    n_train: int
    n_query: int
    n_params: int
    chunk_size: int = 64
    itemsize: int = 4
    train_steps: int = 0


@dataclass(frozen=True)
class Phase:
    """One phase of a method's plan.

    Attributes:
        name: phase name (the key its time is recorded under in the manifest).
        rows: examples the phase processes (a gradient or forward+backward each).
        largest: shape of the largest array the phase holds.
        bytes: bytes of that array.
        note: what the phase does, in words.
        cost: what one row costs: ``"per-example"`` (a per-example gradient, vmapped),
            ``"batched"`` (one example's share of a batched forward+backward, e.g. a K-FAC
            factor pass) or ``"training-step"`` (a row is one optimiser step of the task's
            training-step hook, e.g. a replayed training run); plans time each kind with its
            own measured rate.
        held: bytes held besides ``largest`` during the phase (e.g. a kept projection matrix).
    """

    name: str
    rows: int
    largest: tuple[int, ...]
    bytes: int
    note: str = ""
    cost: str = "per-example"
    held: int = 0


@dataclass(frozen=True)
class CurvatureProblem:
    """What curvature back-ends (K-FAC, GGN-CG) need to see the task as ``loss(f(x), y)``.

    ``H = scale · GGN`` of ``Σ_batches loss_function(model(inputs), targets)`` (+ the task's
    regulariser) must equal the Hessian/GGN of ``L_D`` in the task's units.

    **Rows.** One pass has ``n_rows`` loss rows, ``per_example`` per training example: example
    ``i`` owns rows ``i·per_example … (i+1)·per_example − 1`` (its ``S`` Monte-Carlo draws for a
    diffusion model, ``per_example = S``; one row otherwise). ``batches(pass_index, rows)``
    yields the rows of training examples ``rows`` (a contiguous ``slice`` of
    ``0..n_examples``; None = all) in row order, so the first row of every batch follows from
    the batch sizes before it (the targets' first dimension). Every Monte-Carlo draw is seeded
    per example — example ``i``'s noise of pass ``p`` comes from
    ``example_generator(seed, "fit", i, p)`` (:mod:`attribution_core.per_example`) — so a row
    range yields exactly the rows a full pass yields there, wherever it runs (data shards,
    ``FitInputs.shards``). Consumers draw their own per-row noise the same way (K-FAC's
    MC-Fisher pseudo-targets: stream ``mc-target``, per loss row).

    Attributes:
        model: maps ``inputs`` to **2-D** outputs ``(B, k)`` and shares parameters with the task
            model (a thin wrapper, never a copy).
        loss_function: ``nn.MSELoss(reduction="sum")`` or ``nn.CrossEntropyLoss(reduction="sum")``.
        batches: ``batches(pass_index, rows=None) -> iterable of (inputs, targets)``, re-iterable
            and deterministic (see *Rows*); ``inputs``: a tensor ``(B, ...)`` or a dict the model
            understands, ``targets: (B, k)`` (MSE) or ``(B,)`` (cross-entropy). Picklable (a
            dataclass or a closure over tensors, not over the task) so that a data shard can
            run in another process. A callable taking ``pass_index`` only is still accepted:
            it is run as one local pass.
        scale: multiplies the GGN of the summed loss (e.g. ``1/(N·S)``).
        batch_size_fn: for dict inputs, returns the batch size of ``inputs``.
        n_rows: number of rows (loss terms) in one pass (``n_examples · per_example``).
        per_example: loss rows per training example (``S``; 1 = one row per example).
    """

    model: nn.Module
    loss_function: nn.Module
    batches: Callable[..., Iterable[tuple[Any, Tensor]]]
    scale: float
    batch_size_fn: Callable[[Any], int] | None = None
    n_rows: int = 0
    per_example: int = 1

    @property
    def n_examples(self) -> int:
        """Training examples in one pass: ``n_rows // per_example`` (the rows ``batches`` takes)."""
        return self.n_rows // max(1, self.per_example)


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
