"""(E)K-FAC data passes split into data shards: picklable shard jobs and when to use them.

With ``FitInputs.shards`` asking for several shards (or a distributed executor) and the
``hooks`` back-end, pass 0 (the Kronecker factors) and EK-FAC's correction pass run as one
job per shard of training examples (``ShardRunner.reduce``: phases ``kfac-factors`` and
``ekfac-correction``), and the driver sums the shards' statistics in shard order, then
eigendecomposes once. Each job builds its own :class:`~attribution_kfac.factors.FactorPasses`
on its rows (``DataPass.of(problem, pass_index, rows)``): the task seeds its Monte-Carlo draws
per example and the pseudo-targets are seeded per loss row, so a shard's rows are the rows a
one-pass fit computes there. ``n_data`` stays the whole pass's row count, so a shard returns its
share of the (already scaled) factors and the shares sum to the one-pass factors up to float
round-off (the association of the sums changes). Results return on the CPU (a stored shard is
loaded there too), in the model's dtype.

Not sharded (one local pass, recorded in the curvature's info): the ``curvlinops`` back-end
(its operators accumulate inside one object), a task whose ``batches`` cannot be restricted to
rows (``pass_index`` only), a problem without ``n_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attribution_core import CurvatureProblem, ShardRunner
from attribution_kfac.factors import FactorPasses, Layer
from attribution_kfac.options import KFACOptions
from attribution_kfac.problem import DataPass, row_restrictable

FACTOR_PHASE = "kfac-factors"
CORRECTION_PHASE = "ekfac-correction"


def shard_plan(
    shards: ShardRunner | None, backend: str, problem: CurvatureProblem, ekfac: bool
) -> tuple[ShardRunner | None, dict[str, Any]]:
    """``(runner or None, info)``: whether this fit's passes run per data shard, and why not.

    ``info`` is recorded as the curvature's ``sharding`` entry (hence in the manifest).
    """
    if shards is None or (shards.count <= 1 and not shards.distributed):
        return None, {"sharded": False, "why": "one shard requested (shards: 1, local)"}
    why = None
    if backend != "hooks":
        why = (
            "the curvlinops back-end runs its passes in one process (its operators accumulate "
            "internally); use backend: hooks to shard them"
        )
    elif not problem.n_rows:
        why = "the curvature problem does not state n_rows"
    elif not row_restrictable(problem):
        why = "the task's curvature_problem batches take pass_index only (no rows)"
    if why is not None:
        return None, {"sharded": False, "why": why}
    phases = [FACTOR_PHASE, CORRECTION_PHASE] if ekfac else [FACTOR_PHASE]
    bounds = [[r.start, r.stop] for r in shards.ranges(problem.n_examples)]
    return shards, {"sharded": True, "shards": len(bounds), "phases": phases, "bounds": bounds}


@dataclass(frozen=True)
class _ShardPasses:
    """What every shard job needs to build its :class:`FactorPasses` (picklable).

    Attributes:
        problem: the task's curvature problem (its model travels with the job).
        layers: ``(module name, weight included, bias included)`` per hooked layer; the
            modules are looked up in ``problem.model`` inside the job (one copy of the model).
        options: the Hessian's validated options.
        seed: the pseudo-target seed.
    """

    problem: CurvatureProblem
    layers: tuple[tuple[str, bool, bool], ...]
    options: KFACOptions
    seed: int

    @classmethod
    def of(
        cls,
        problem: CurvatureProblem,
        layers: list[Layer],
        options: KFACOptions,
        seed: int,
        **extra: Any,
    ) -> Any:
        """The job for ``layers`` (``extra``: the subclass's own fields)."""
        spec = tuple((x.name, x.weight, x.bias) for x in layers)
        return cls(problem, spec, options, seed, **extra)

    def passes(self) -> FactorPasses:
        model = self.problem.model
        layers = [Layer(n, model.get_submodule(n), w, b) for n, w, b in self.layers]
        return FactorPasses(
            model,
            self.problem.loss_function,
            layers,
            self.options,
            n_data=self.problem.n_rows,
            seed=self.seed,
            device=next(model.parameters()).device,
        )


@dataclass(frozen=True)
class KroneckerShard(_ShardPasses):
    """Shard job of pass 0: ``{"A": {layer: (d_a, d_a)}, "G": {layer: (d_out, d_out)}}``.

    The shard's share of the factors (before ``G = I`` of the forward-only Fisher), on the CPU.
    """

    def __call__(self, rows: slice) -> dict[str, dict[str, Tensor]]:
        A, G = self.passes().kronecker_sums(DataPass.of(self.problem, 0, rows))
        return {"A": cpu_tensors(A), "G": cpu_tensors(G)}


@dataclass(frozen=True)
class CorrectionShard(_ShardPasses):
    """Shard job of EK-FAC's pass 1: ``{layer: {part: eigenvalues}}`` in the given eigenbases.

    Attributes:
        QA: ``(d_a, d_a)`` input eigenbasis per layer with a weight, in the model's dtype.
        QG: ``(d_out, d_out)`` gradient eigenbasis per layer, in the model's dtype.
    """

    QA: dict[str, Tensor] | None = None
    QG: dict[str, Tensor] | None = None

    def __call__(self, rows: slice) -> dict[str, dict[str, Tensor]]:
        passes = self.passes()
        device = passes.device
        QA = {k: v.to(device) for k, v in (self.QA or {}).items()}
        QG = {k: v.to(device) for k, v in (self.QG or {}).items()}
        out = passes.eigenvalue_correction(DataPass.of(self.problem, 1, rows), QA, QG)
        return {layer: cpu_tensors(parts) for layer, parts in out.items()}


def cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` on the CPU (what shard jobs return, and the eigenbases they carry)."""
    return {k: v.detach().to("cpu") for k, v in tensors.items()}


def to_device(tree: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A (nested) dict of tensors moved to ``device``."""
    return {
        k: to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in tree.items()
    }
