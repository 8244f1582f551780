"""Hessian ``arnoldi``: influence in the top-r eigenspace of the GGN (Schioppa et al., 2022).

Schioppa, Zablotskaia, Vilar, Sokolov, "Scaling Up Influence Functions", AAAI 2022. Arnoldi
iteration (:mod:`attribution_influence.krylov`, float64, full reorthogonalisation) on the GGN
``H`` of ``L_D`` (:mod:`attribution_influence.ggn`, all rows of the curvature problem's pass 0)
gives its ``r`` Ritz pairs ``(μ_i, u_i)`` of largest ``|μ|``; ``U = [u_1 … u_r]: (p, r)``. Then

    solve(G) = U diag(1/(μ_i + λ + 2·l2)) Uᵀ G,          G: (n, p),

i.e. ``(H + λ_tot I)⁻¹`` restricted to ``span(U)``, and **zero on the orthogonal complement**:
like Schioppa et al. (who project gradients onto the top subspace, eq. 9), we drop the
complement instead of scaling it by ``1/λ_tot``. With ``r = p`` (and ``iterations = p``) this is
exactly ``(H + λ_tot I)⁻¹``; with ``r < p`` it is the pseudo-inverse-like low-rank influence
``g_qᵀ U diag(1/(μ+λ)) Uᵀ g_j``.

Cost: ``iterations`` GGN-vector products over all R rows (≈ ``iterations`` forward+backward
passes over the data), ``O(p · iterations²)`` for reorthogonalisation; memory
``p · iterations`` float64 for the basis, ``p · r`` kept. ``solve`` costs ``O(n p r)``.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attribution_core import (
    ConfigError,
    Curvature,
    FitInputs,
    NumericalError,
)
from attribution_influence.ggn import GGNHessian
from attribution_influence.krylov import arnoldi


class ArnoldiOptions(BaseModel):
    """Options of the ``arnoldi`` Hessian."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rank: int = Field(20, ge=1, description="r: eigenpairs kept (largest |μ|; clipped to p).")
    iterations: int | None = Field(
        None,
        ge=1,
        description="Arnoldi steps m ≥ r (None: min(p, 3·rank)); each is one GGN-vector "
        "product over all rows.",
    )
    damping: float = Field(
        1e-4,
        ge=0.0,
        description="λ in 1/(μ_i + λ), absolute in the units of L_D (the task's 2·l2 is added).",
    )
    n_samples: int | None = Field(
        None,
        ge=1,
        description="Monte-Carlo draws per training example in the GGN (None: the "
        "train_function's n_samples).",
    )
    max_rows: int = Field(256, ge=1, description="Rows per vectorised GGN product (memory).")


class LowRankCurvature(Curvature):
    """``solve(G) = U diag(1/(μ + λ_tot)) Uᵀ G`` (module doc), float64.

    Args:
        values: ``(r,)`` Ritz values ``μ_i`` of the GGN (without damping).
        vectors: ``(p, r)`` orthonormal Ritz vectors.
        damping: λ (absolute).
        l2: the task's ``l2``; ``2·l2`` is added to λ.
        info: facts for ``describe()``.

    Raises:
        NumericalError: a kept ``μ_i + λ_tot ≤ 0`` (an indefinite damped GGN).
    """

    def __init__(
        self, values: Tensor, vectors: Tensor, damping: float, l2: float, info: dict[str, Any]
    ) -> None:
        self.damping = float(damping)
        self.total_damping = float(damping) + 2.0 * float(l2)
        denom = values + self.total_damping
        if bool((denom <= 0).any()):
            raise NumericalError(
                f"hessian arnoldi: eigenvalue {float(values.min()):.3e} + total damping "
                f"{self.total_damping:g} ≤ 0; raise damping or lower rank"
            )
        self.values, self.vectors = values, vectors
        self.inverse = 1.0 / denom
        self.info = info

    def solve(self, gradients: Tensor) -> Tensor:
        """``(n, p) -> (n, p)``: ``G U diag(1/(μ + λ_tot)) Uᵀ`` row-wise."""
        p = self.vectors.shape[0]
        if gradients.ndim != 2 or gradients.shape[1] != p:
            raise ValueError(
                f"gradients mismatch: expected (n, {p}), got {tuple(gradients.shape)}."
            )
        U = self.vectors.to(gradients.device)
        coeff = (gradients.double() @ U) * self.inverse.to(gradients.device)
        return (coeff @ U.T).to(gradients.dtype)

    def describe(self) -> dict[str, Any]:
        """Damping, the kept eigenvalues and their Ritz residuals."""
        return {
            "damping": self.damping,
            "total_damping": self.total_damping,
            "eigenvalues": [float(v) for v in self.values],
            **self.info,
        }


class ArnoldiHessian(GGNHessian):
    """Top-r eigenspace of the GGN by Arnoldi; influence restricted to it (module doc).

    Args:
        **options: the fields of :class:`ArnoldiOptions`.

    Raises:
        ConfigError: an option is unknown or out of range.
    """

    name = "arnoldi"

    options_model = ArnoldiOptions

    def fit(self, inputs: FitInputs) -> LowRankCurvature:
        """Run ``iterations`` Arnoldi steps on the full GGN and keep the top ``rank`` pairs."""
        opts = self.options
        t0 = time.perf_counter()
        n_samples, ggn = self.products(inputs)
        p = ggn.n_params
        rank = min(opts.rank, p)
        steps = min(p, opts.iterations or 3 * rank)
        if steps < rank:
            raise ConfigError(
                f"hessian arnoldi: iterations={steps} < rank={rank}; set iterations ≥ rank "
                f"(or leave it unset: min(p, 3·rank))"
            )
        ritz = arnoldi(ggn.matmat, p, steps, inputs.seed, ggn.theta.device)
        values, vectors = ritz.values[:rank], ritz.vectors[:, :rank]
        info = {
            "rank": rank,
            "iterations": steps,
            "n_samples": n_samples,
            "n_params": p,
            "ggn_vector_products": ggn.products,
            "max_ritz_residual": float(ritz.residuals[:rank].max()),
            "complement": "dropped (projection onto the top-r eigenspace)",
            "fit_seconds": time.perf_counter() - t0,
        }
        return LowRankCurvature(values, vectors, opts.damping, inputs.task.l2, info)
