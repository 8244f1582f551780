"""Hessian ``ggn-cg``: the exact damped GGN of ``L_D``, solved by conjugate gradients.

``H v = s · GGN(Σ_rows loss) v`` with curvlinops' ``GGNLinearOperator`` on the task's curvature
problem (pass 0: a fixed set of Monte-Carlo draws, the same one ``dense_ggn`` uses), plus
``(λ + 2·l2) v``. Each CG iteration is one data pass for up to ``max_columns`` right-hand sides.
The reference for models too large for a dense matrix (e.g. a small U-Net).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from attribution_core.errors import NumericalError
from attribution_core.interfaces import (
    Curvature,
    GradientSource,
    HessianApproximation,
    Measurement,
    Task,
)
from attribution_kfac.problem import (
    check_params,
    curvlinops,
    get_problem,
    problem_parameters,
)


class _FixedPass:
    """Re-iterable ``problem.batches(0)`` (the same draws on every matrix product)."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches(0))


class CGCurvature(Curvature):
    """``solve(G)``: batched conjugate gradients on ``s·GGN + λ_tot I`` (float64 vectors)."""

    def __init__(
        self,
        operator: Any,
        scale: float,
        damping: float,
        l2: float,
        n_params: int,
        rtol: float,
        maxiter: int,
        max_columns: int,
        info: dict[str, Any],
    ) -> None:
        self.operator = operator
        self.scale = float(scale)
        self.damping = float(damping)
        self.total_damping = float(damping) + 2.0 * float(l2)
        self.n_params = n_params
        self.rtol, self.maxiter, self.max_columns = rtol, maxiter, max_columns
        self.info = dict(info)
        self.iterations: list[int] = []

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


class GGNCGHessian(HessianApproximation):
    """The exact damped GGN, applied matrix-free and inverted by conjugate gradients."""

    name = "ggn-cg"

    def __init__(
        self,
        damping: float = 1e-4,
        damping_mode: str = "absolute",
        n_samples: int | None = None,
        rtol: float = 1e-6,
        maxiter: int = 500,
        max_columns: int = 32,
        trace_probes: int = 32,
    ) -> None:
        self.damping, self.damping_mode, self.n_samples = damping, damping_mode, n_samples
        self.rtol, self.maxiter, self.max_columns = rtol, maxiter, max_columns
        self.trace_probes = trace_probes

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
    ) -> CGCurvature:
        """Build the GGN operator (no data pass yet) and the CG solver."""
        check_params(params, self.name)
        t0 = time.perf_counter()
        n_samples = self.n_samples or max(1, int(getattr(train_measurement, "n_samples", 1)))
        problem = get_problem(model, task, seed, n_samples, self.name)
        plist, excluded = problem_parameters(problem, params, self.name)
        op = curvlinops().GGNLinearOperator(
            problem.model,
            problem.loss_function,
            plist,
            _FixedPass(problem.batches),
            progressbar=progress,
            check_deterministic=False,
            num_data=problem.n_rows or None,
            batch_size_fn=problem.batch_size_fn,
        )
        p = sum(t.numel() for t in params.values())
        info = {"hessian": self.name, "n_samples": n_samples, "excluded": excluded}
        curv = CGCurvature(
            op, problem.scale, 0.0, task.l2, p, self.rtol, self.maxiter, self.max_columns, info
        )
        damping = self.damping
        if self.damping_mode == "relative":
            gen = torch.Generator().manual_seed(int(seed))
            Z = (torch.randint(0, 2, (p, self.trace_probes), generator=gen) * 2 - 1).double()
            Z = Z.to(plist[0].device)
            tr = (
                float((Z * (problem.scale * (op @ Z.to(op.dtype)).double())).sum())
                / self.trace_probes
            )
            info["trace_estimate"] = tr
            damping = self.damping * (tr / p + 2 * task.l2)
        curv.damping = damping
        curv.total_damping = damping + 2.0 * task.l2
        curv.info["setup_seconds"] = time.perf_counter() - t0
        return curv
