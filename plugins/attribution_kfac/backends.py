"""The two back-ends of the (E)K-FAC data passes: our hooks, or curvlinops' operators.

``hooks`` (:class:`attribution_kfac.factors.FactorPasses`: no weight gradients, Toeplitz conv
covariances) reproduces ``curvlinops.KFACLinearOperator`` / ``EKFACLinearOperator`` to float
round-off; ``curvlinops`` runs those operators themselves. :func:`resolve_backend` picks the one a
fit uses (``hooks`` falls back to ``curvlinops`` for layers or losses it does not support) —
part of the factor cache key and recorded in the curvature's info. Both back-ends fill the same
dicts: ``A`` / ``G`` per layer name from pass 0, and EK-FAC's corrected eigenvalues
(``<layer>|E``, ``<layer>|E_bias``) from pass 1, rotated in the float64 eigenbases of ``out``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from attribution_core.errors import ConfigError, NumericalError
from attribution_core.interfaces import CurvatureProblem
from attribution_kfac.curvature import Block
from attribution_kfac.factors import FactorPasses, Layer, unsupported
from attribution_kfac.problem import Passes, curvlinops, log

if TYPE_CHECKING:
    from attribution_kfac.kfac import KFACHessian

BACKENDS = ("hooks", "curvlinops")


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
    if requested not in BACKENDS:
        raise ConfigError(f"backend: {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "curvlinops":
        return requested
    why = unsupported(layers, problem.loss_function)
    if why is None:
        return "hooks"
    log.info("hessian %s: the hooks back-end does not support %s; using curvlinops", who, why)
    return "curvlinops"


def kronecker_factors(
    hess: KFACHessian,
    backend: str,
    problem: CurvatureProblem,
    plist: list[Tensor],
    layers: list[Layer],
    data: Passes,
    seed: int,
    progress: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Any]:
    """Pass 0: ``(A, G, runner)``; ``runner`` is handed to :func:`eigenvalue_correction`."""
    if backend == "hooks":
        n_data = problem.n_rows
        if not n_data:  # as curvlinops: one traversal counting rows
            data.pass_index = 0
            size = problem.batch_size_fn or (lambda X: X.shape[0])
            n_data = sum(size(X) for X, _ in data)
        passes = FactorPasses(
            problem.model,
            problem.loss_function,
            layers,
            data,
            fisher=hess.fisher,
            mc_samples=hess.mc_samples,
            approx=hess.approx,
            joint=not hess.separate_weight_and_bias,
            n_data=n_data,
            seed=seed,
            device=plist[0].device,
        )
        data.pass_index = 0
        A, G = passes.kronecker_factors()
        return A, G, passes
    cl = curvlinops()
    cls = cl.EKFACLinearOperator if hess.ekfac else cl.KFACLinearOperator
    op = cls(
        problem.model,
        problem.loss_function,
        plist,
        data,
        progressbar=progress,
        check_deterministic=False,
        seed=seed,
        fisher_type=hess.fisher,
        mc_samples=hess.mc_samples,
        kfac_approx=hess.approx,
        num_per_example_loss_terms=1,
        separate_weight_and_bias=hess.separate_weight_and_bias,
        num_data=problem.n_rows or None,
        batch_size_fn=problem.batch_size_fn,
    )
    data.pass_index = 0
    op.compute_kronecker_factors()  # once per fresh operator (a second call would add)
    return op._input_covariances, op._gradient_covariances, op


def eigenvalue_correction(
    runner: Any,
    data: Passes,
    blocks: list[Block],
    out: dict[str, Tensor],
    plist: list[Tensor],
) -> None:
    """EK-FAC pass 1 (fresh noise): corrected eigenvalues in ``out``'s float64 eigenbases.

    The eigenvectors rotate in the model's dtype (as curvlinops does); ``out`` keeps that
    rounded basis (in float64), so the solve uses exactly the basis the eigenvalues belong to.
    """
    dtype = plist[0].dtype
    QA: dict[str, Tensor] = {}
    QG: dict[str, Tensor] = {}
    for block in blocks:
        QG[block.layer] = out[f"{block.layer}|QG"].to(dtype)
        out[f"{block.layer}|QG"] = QG[block.layer].to(torch.float64)
        if f"{block.layer}|QA" in out:
            QA[block.layer] = out[f"{block.layer}|QA"].to(dtype)
            out[f"{block.layer}|QA"] = QA[block.layer].to(torch.float64)
    data.pass_index = 1
    if isinstance(runner, FactorPasses):
        corrected = runner.eigenvalue_correction(QA, QG)
    else:
        corrected = _curvlinops_correction(runner, blocks, QA, QG, plist)
    named = []
    for block in blocks:
        vals = corrected[block.layer]
        for part, key in (("joint", "E"), ("weight", "E"), ("bias", "E_bias")):
            if part in vals:
                named.append((block.label, f"EK-FAC eigenvalues of {part}", vals[part]))
                out[f"{block.layer}|{key}"] = vals[part].to(torch.float64)
    check_finite(named)


def _curvlinops_correction(
    op: Any,
    blocks: list[Block],
    QA: dict[str, Tensor],
    QG: dict[str, Tensor],
    plist: list[Tensor],
) -> dict[str, dict[str, Tensor]]:
    """``EKFACLinearOperator.compute_eigenvalue_correction`` in the bases ``QA`` / ``QG``."""
    # curvlinops rotates with the eigenvectors it finds in these dicts (it only computes them
    # itself, in the model's dtype, when they are empty)
    for block in blocks:
        op._gradient_covariances.pop(block.layer, None)
        op._input_covariances.pop(block.layer, None)
        op._gradient_covariances_eigenvectors[block.layer] = QG[block.layer]
        if block.layer in QA:
            op._input_covariances_eigenvectors[block.layer] = QA[block.layer]
    op.compute_eigenvalue_correction()
    position = {id(p): i for i, p in enumerate(plist)}
    result: dict[str, dict[str, Tensor]] = {}
    for block in blocks:
        corrected = op._corrected_eigenvalues[block.layer]
        if isinstance(corrected, Tensor):
            result[block.layer] = {"joint": corrected}
            continue
        mod = op._model_func.get_submodule(block.layer)
        vals = result.setdefault(block.layer, {})
        for pname in ("weight", "bias"):
            t = getattr(mod, pname, None)
            if t is not None and id(t) in position and position[id(t)] in corrected:
                vals[pname] = corrected[position[id(t)]]
    return result
