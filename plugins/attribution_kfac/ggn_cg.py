"""Hessian ``ggn-cg``: the exact damped GGN of ``L_D``, solved by conjugate gradients.

``H v = s · GGN(Σ_rows loss) v`` with curvlinops' ``GGNLinearOperator`` on the task's curvature
problem (pass 0: a fixed set of Monte-Carlo draws, the same one ``dense_ggn`` uses), plus
``(λ + 2·l2) v``. Each CG iteration is one data pass for up to ``max_columns`` right-hand sides.
The reference for models too large for a dense matrix (e.g. a small U-Net).

Not sharded: every CG iteration is a full GGN-product pass inside curvlinops' operator, in this
process, whatever ``FitInputs.shards`` says (recorded as ``sharding`` in the curvature's info).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import Tensor

from attribution_core import (
    Curvature,
    FitInputs,
    HessianApproximation,
    NumericalError,
    validate_model,
)
from attribution_kfac import curvlinops_adapter
from attribution_kfac.options import GGNCGOptions
from attribution_kfac.problem import (
    DataPass,
    check_params,
    fit_samples,
    get_problem,
    problem_parameters,
)


class CGCurvature(Curvature):
    """``solve(G)``: batched conjugate gradients on ``s·GGN + λ_tot I`` (float64 vectors).

    Args:
        operator: curvlinops' GGN operator of the summed loss (``op @ X``, ``X: (p, k)``).
        scale: ``s`` of the curvature problem.
        damping: λ, resolved to absolute units.
        l2: the task's ``l2``; ``2·l2`` (``∇²R``) is added to the damping.
        n_params: ``p``.
        options: ``rtol``, ``maxiter`` and ``max_columns`` are used.
        info: facts for ``describe()``.
    """

    def __init__(
        self,
        operator: Any,
        scale: float,
        damping: float,
        l2: float,
        n_params: int,
        options: GGNCGOptions,
        info: dict[str, Any],
    ) -> None:
        self.operator = operator
        self.scale = float(scale)
        self.damping = float(damping)
        self.total_damping = float(damping) + 2.0 * float(l2)
        self.n_params = n_params
        self.rtol, self.maxiter = options.rtol, options.maxiter
        self.max_columns = options.max_columns
        self.info = dict(info)
        self.iterations: list[int] = []  # CG iterations per block of columns, for describe()

    def matmat(self, X: Tensor) -> Tensor:
        """``(s·GGN + λ_tot I) X`` for ``X: (p, k)`` float64."""
        dtype = self.operator.dtype
        GX = (self.operator @ X.to(dtype)).to(torch.float64)
        return self.scale * GX + self.total_damping * X

    def _cg(self, B: Tensor) -> Tensor:
        """Solve ``A X = B`` column-wise, ``B: (p, k)``."""
        X = torch.zeros_like(B)
        R = B.clone()
        P = R.clone()
        rs = (R * R).sum(0)
        target = (self.rtol * B.norm(dim=0)) ** 2
        active = rs > target
        it = 0
        while bool(active.any()) and it < self.maxiter:
            AP = self.matmat(P)
            pAp = (P * AP).sum(0)
            if bool((pAp[active] <= 0).any()):
                raise NumericalError(
                    f"ggn-cg: the damped GGN is not positive definite along a search direction "
                    f"(pᵀAp = {float(pAp[active].min()):.3e}) with total damping "
                    f"{self.total_damping:g}; set damping > 0 (e.g. 1e-4)"
                )
            alpha = torch.where(active, rs / torch.where(active, pAp, 1.0), 0.0)
            X += alpha * P
            R -= alpha * AP
            rs_new = (R * R).sum(0)
            beta = torch.where(active, rs_new / torch.where(active, rs, 1.0), 0.0)
            P = R + beta * P
            rs = rs_new
            active = rs > target
            it += 1
        self.iterations.append(it)
        if bool(active.any()):
            worst = float((rs[active] / target[active].clamp_min(1e-300)).sqrt().max()) * self.rtol
            warnings.warn(
                f"ggn-cg: {int(active.sum())} of {B.shape[1]} systems did not reach rtol "
                f"{self.rtol:g} in maxiter={self.maxiter} (relative residual {worst:.2e}); "
                f"raise maxiter or damping",
                RuntimeWarning,
                stacklevel=3,
            )
        return X

    def solve(self, gradients: Tensor) -> Tensor:
        """``(n, p) -> (n, p)``: ``(H + λ_tot I)⁻¹`` on every row, ``max_columns`` at a time."""
        if gradients.ndim != 2 or gradients.shape[1] != self.n_params:
            raise ValueError(
                f"gradients mismatch: expected (n, {self.n_params}), got {tuple(gradients.shape)}."
            )
        G = gradients.to(torch.float64)
        out = torch.empty_like(G)
        for a in range(0, G.shape[0], self.max_columns):
            b = min(a + self.max_columns, G.shape[0])
            out[a:b] = self._cg(G[a:b].T.contiguous()).T
        return out.to(gradients.dtype)

    def describe(self) -> dict[str, Any]:
        """Damping, tolerance and the iterations each block of columns needed."""
        return {
            "damping": self.damping,
            "total_damping": self.total_damping,
            "scale": self.scale,
            "rtol": self.rtol,
            "maxiter": self.maxiter,
            "cg_iterations": self.iterations,
            **self.info,
        }


def _trace_estimate(op: Any, scale: float, p: int, probes: int, seed: int, device) -> float:
    """Hutchinson estimate of ``tr(s·GGN)`` with ``probes`` Rademacher vectors ``(p, probes)``."""
    gen = torch.Generator().manual_seed(int(seed))
    Z = (torch.randint(0, 2, (p, probes), generator=gen) * 2 - 1).double()
    Z = Z.to(device)
    return float((Z * (scale * (op @ Z.to(op.dtype)).double())).sum()) / probes


class GGNCGHessian(HessianApproximation):
    """The exact damped GGN, applied matrix-free and inverted by conjugate gradients.

    Args:
        **options: the fields of :class:`~attribution_kfac.options.GGNCGOptions` (validated
            once, kept frozen in ``self.options``).

    Raises:
        ConfigError: an option is unknown or out of range.
    """

    name = "ggn-cg"

    def __init__(self, **options: Any) -> None:
        self.options: GGNCGOptions = validate_model(  # type: ignore[assignment]
            GGNCGOptions, options, where=f"hessian {self.name!r}"
        )

    def describe(self) -> dict[str, Any]:
        """Name, space and every option (before fitting)."""
        return {**super().describe(), **self.options.model_dump()}

    def fit(self, inputs: FitInputs) -> CGCurvature:
        """Build the GGN operator on pass 0 (no data pass yet) and the CG solver.

        With ``damping_mode: relative`` the trace estimate costs ``trace_probes`` products.
        """
        opts, params, task = self.options, inputs.params, inputs.task
        check_params(params, self.name)
        t0 = time.perf_counter()
        n_samples = fit_samples(opts.n_samples, inputs.train_function)
        problem = get_problem(inputs.model, task, inputs.seed, n_samples, self.name)
        plist, excluded = problem_parameters(problem, params, self.name)
        op = curvlinops_adapter.ggn_operator(
            problem, plist, DataPass.of(problem, 0), inputs.progress
        )
        p = sum(t.numel() for t in params.values())
        info: dict[str, Any] = {
            "hessian": self.name,
            **opts.recorded(),
            "n_samples": n_samples,
            "excluded": excluded,
            "sharding": {
                "sharded": False,
                "why": "ggn-cg's CG iterations are GGN-product passes inside one curvlinops "
                "operator (one process)",
            },
        }
        damping = opts.damping
        if opts.damping_mode == "relative":
            tr = _trace_estimate(
                op, problem.scale, p, opts.trace_probes, inputs.seed, plist[0].device
            )
            info["trace_estimate"] = tr
            damping = opts.damping * (tr / p + 2 * task.l2)
        info["setup_seconds"] = time.perf_counter() - t0
        return CGCurvature(op, problem.scale, damping, task.l2, p, opts, info)
