"""The data passes of one (E)K-FAC fit, run by one of two back-ends: our hooks, or curvlinops.

``hooks`` (:class:`attribution_kfac.factors.FactorPasses`: no weight gradients, Toeplitz conv
covariances) reproduces ``curvlinops.KFACLinearOperator`` / ``EKFACLinearOperator`` to float
round-off; ``curvlinops`` runs those operators themselves (through
:mod:`attribution_kfac.curvlinops_adapter`). :func:`resolve_backend` picks the one a fit uses
(``hooks`` falls back to ``curvlinops`` for layers or losses it does not support) — part of the
factor cache key and recorded in the curvature's info.

:func:`fit_factors` runs pass 0 (Kronecker factors ``A`` / ``G`` per layer) on
``DataPass.of(problem, 0)``, eigendecomposes them in float64 (once, on the driver), and for
EK-FAC runs pass 1 on ``DataPass.of(problem, 1)`` (fresh noise): the corrected eigenvalues in
those eigenbases. With ``FactorFit.shards`` the ``hooks`` passes run as one job per data shard
and their statistics are summed in shard order (:mod:`attribution_kfac.sharded`). The back-ends
see a :class:`FactorFit` record (the validated options and the problem), never the Hessian
object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attribution_core import CurvatureProblem, NumericalError, ShardRunner
from attribution_kfac import curvlinops_adapter
from attribution_kfac.curvature import Block
from attribution_kfac.factors import FactorPasses, Layer, unsupported
from attribution_kfac.options import KFACOptions
from attribution_kfac.problem import DataPass, log
from attribution_kfac.sharded import (
    CORRECTION_PHASE,
    FACTOR_PHASE,
    CorrectionShard,
    KroneckerShard,
    cpu_tensors,
    to_device,
)


@dataclass(frozen=True)
class FactorFit:
    """Everything the data passes of one (E)K-FAC fit need (read-only).

    Attributes:
        options: the Hessian's validated options (fisher, mc_samples, approx,
            separate_weight_and_bias are used here).
        ekfac: also run EK-FAC's eigenvalue correction (pass 1).
        backend: the resolved back-end, ``hooks`` or ``curvlinops``.
        problem: the task's curvature problem.
        params: the included parameters of ``problem.model``, in flat order.
        blocks: one per Linear/Conv2d layer holding included parameters.
        layers: the hooked modules of ``blocks`` (same order).
        seed: seed of the pseudo-targets (per loss row, :mod:`attribution_kfac.draws`).
        progress: show curvlinops' progress bars.
        shards: run the ``hooks`` passes per data shard on it (:mod:`attribution_kfac.sharded`,
            which decides); None = one local pass.
    """

    options: KFACOptions
    ekfac: bool
    backend: str
    problem: CurvatureProblem
    params: list[Tensor]
    blocks: list[Block]
    layers: list[Layer]
    seed: int
    progress: bool = False
    shards: ShardRunner | None = None


def check_finite(named: list[tuple[str, str, Tensor | None]]) -> None:
    """Raise NumericalError listing every ``(layer, factor)`` with NaN/Inf entries."""
    bad = [
        f"{label!r} ({what}: {int((~torch.isfinite(t)).sum())} entries)"
        for label, what, t in named
        if t is not None and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise NumericalError(
            f"non-finite (NaN/Inf) K-FAC factors in layer {', '.join(bad)}; check the model "
            f"weights and training data for NaN/Inf (e.g. a diverged training run)"
        )


def fit_layers(problem: CurvatureProblem, blocks: list[Block]) -> list[Layer]:
    """The hooked modules of ``blocks`` (with which of weight / bias are in the curvature)."""
    return [
        Layer(b.layer, problem.model.get_submodule(b.layer), b.weight is not None,
              b.bias is not None)
        for b in blocks
    ]  # fmt: skip


def resolve_backend(
    requested: str, layers: list[Layer], problem: CurvatureProblem, who: str
) -> str:
    """The back-end a fit uses: ``requested``, or ``curvlinops`` where the hooks cannot."""
    if requested == "curvlinops":
        return requested
    why = unsupported(layers, problem.loss_function)
    if why is None:
        return "hooks"
    log.info("hessian %s: the hooks back-end does not support %s; using curvlinops", who, why)
    return "curvlinops"


def _eigh64(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``(d,)`` and eigenvectors ``(d, d)`` of a symmetric factor, in float64."""
    M = M.to(torch.float64)
    lam, Q = torch.linalg.eigh((M + M.T) / 2)
    return lam, Q


def fit_factors(fit: FactorFit) -> dict[str, Tensor]:
    """One (K-FAC) or two (EK-FAC) data passes → float64 eigen-factors.

    Returns:
        Contiguous float64 tensors keyed ``"<layer>|QG"`` ``(d_out, d_out)``, ``"|lam_g"``
        ``(d_out,)`` and, for layers with a weight, ``"|QA"`` ``(d_a, d_a)``, ``"|lam_a"``
        ``(d_a,)``, ``"|E"`` ``(d_out, d_a)``; ``"|E_bias"`` ``(d_out,)`` for a separate bias
        (the layout of :class:`attribution_kfac.curvature.KroneckerCurvature`). EK-FAC replaces
        ``E`` / ``E_bias`` by the corrected eigenvalues.

    Raises:
        NumericalError: a factor or corrected eigenvalue is NaN/Inf (names the layer).
    """
    A, G, runner = _kronecker_factors(fit, DataPass.of(fit.problem, 0))
    named = []
    for block in fit.blocks:
        named.append((block.label, "input covariance A", A.get(block.layer)))
        named.append((block.label, "gradient covariance G", G[block.layer]))
    check_finite(named)
    out: dict[str, Tensor] = {}
    for block in fit.blocks:
        lam_g, QG = _eigh64(G[block.layer])
        out[f"{block.layer}|QG"], out[f"{block.layer}|lam_g"] = QG, lam_g
        if block.layer in A:
            lam_a, QA = _eigh64(A[block.layer])
            out[f"{block.layer}|QA"], out[f"{block.layer}|lam_a"] = QA, lam_a
            out[f"{block.layer}|E"] = torch.outer(lam_g, lam_a)
        if block.bias is not None and not block.joint:
            out[f"{block.layer}|E_bias"] = lam_g.clone()
    if fit.ekfac:
        _eigenvalue_correction(runner, DataPass.of(fit.problem, 1), fit, out)
    # contiguous: the same memory layout (hence the same bits downstream) as a cache read
    return {k: v.contiguous() for k, v in out.items()}


def _kronecker_factors(
    fit: FactorFit, data: DataPass
) -> tuple[dict[str, Tensor], dict[str, Tensor], Any]:
    """Pass 0 on ``data``: ``(A, G, runner)``; ``runner`` runs the correction pass."""
    problem = fit.problem
    if fit.backend == "hooks":
        n_data = problem.n_rows
        if not n_data:  # as curvlinops: one traversal counting rows
            size = problem.batch_size_fn or (lambda X: X.shape[0])
            n_data = sum(size(X) for X, _ in data)
        passes = FactorPasses(
            problem.model,
            problem.loss_function,
            fit.layers,
            fit.options,
            n_data=n_data,
            seed=fit.seed,
            device=fit.params[0].device,
        )
        if fit.shards is None:
            A, G = passes.kronecker_factors(data)
            return A, G, passes
        # Σ_shards of each shard's share, in shard order; G = I (forward-only) after the sum
        job = KroneckerShard.of(problem, fit.layers, fit.options, fit.seed)
        sums = fit.shards.reduce(FACTOR_PHASE, job, problem.n_examples)
        A, G = to_device(sums["A"], passes.device), to_device(sums["G"], passes.device)
        passes.finish_factors(G)
        return A, G, passes
    op = curvlinops_adapter.kronecker_operator(
        problem, fit.params, data, fit.options, ekfac=fit.ekfac, seed=fit.seed,
        progress=fit.progress,
    )  # fmt: skip
    A, G = curvlinops_adapter.kronecker_factors(op)
    return A, G, op


def _eigenvalue_correction(
    runner: Any, data: DataPass, fit: FactorFit, out: dict[str, Tensor]
) -> None:
    """EK-FAC pass 1 on ``data``: corrected eigenvalues in ``out``'s float64 eigenbases.

    The eigenvectors rotate in the model's dtype (as curvlinops does); ``out`` keeps that
    rounded basis (in float64), so the solve uses exactly the basis the eigenvalues belong to.
    """
    dtype = fit.params[0].dtype
    QA: dict[str, Tensor] = {}
    QG: dict[str, Tensor] = {}
    for block in fit.blocks:
        QG[block.layer] = out[f"{block.layer}|QG"].to(dtype)
        out[f"{block.layer}|QG"] = QG[block.layer].to(torch.float64)
        if f"{block.layer}|QA" in out:
            QA[block.layer] = out[f"{block.layer}|QA"].to(dtype)
            out[f"{block.layer}|QA"] = QA[block.layer].to(torch.float64)
    if isinstance(runner, FactorPasses) and fit.shards is not None:
        # the eigenbases travel with the job (once per pass), the shards' sums come back
        job = CorrectionShard.of(
            fit.problem, fit.layers, fit.options, fit.seed,
            QA=cpu_tensors(QA), QG=cpu_tensors(QG),
        )  # fmt: skip
        sums = fit.shards.reduce(CORRECTION_PHASE, job, fit.problem.n_examples)
        corrected = to_device(sums, runner.device)
    elif isinstance(runner, FactorPasses):
        corrected = runner.eigenvalue_correction(data, QA, QG)
    else:
        corrected = curvlinops_adapter.corrected_eigenvalues(runner, data, QA, QG)
    named = []
    for block in fit.blocks:
        vals = corrected[block.layer]
        for part, key in (("joint", "E"), ("weight", "E"), ("bias", "E_bias")):
            if part in vals:
                named.append((block.label, f"EK-FAC eigenvalues of {part}", vals[part]))
                out[f"{block.layer}|{key}"] = vals[part].to(torch.float64)
    check_finite(named)
