"""Hessian ``projected-fisher``: TRAK's empirical Fisher in the projected space.

With projected, draw-averaged training gradients ``φ_j = Φᵀ g_j`` (``k`` entries; the paper's
eq. 11, GGN^loss, in the projected space)::

    F = (1/N) Σ_j φ_j φ_jᵀ            (k, k), float64
    solve(Q) = (F + λI)⁻¹ Q            Q: (n, k)

``λ`` is absolute (``damping_mode: absolute``) or ``λ = c · tr(F)/k`` — ``c`` times the mean
eigenvalue of ``F`` (``damping_mode: relative``, the default, ``c = 0.1``). The default ``c``
follows kronfluence's damping heuristic ("0.1 × mean eigenvalues", ``ScoreArguments.damping``,
after Grosse et al. 2023): TRAK itself recommends no damping (Park et al. 2023, §6), which leaves
``F`` singular whenever ``N < k`` — the paper (Appendix J.4) uses 1e-9 absolute as its "default"
and finds TRAK needs damping tuning. Damping 0 with ``N < k`` is refused (traker's default
``lambda_reg=0`` silently returns noise there).

The task's regulariser is not part of ``F`` (TRAK's empirical Fisher has none).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attribution_core import (
    ConfigError,
    Curvature,
    FitInputs,
    GradientStream,
    HessianApproximation,
    NumericalError,
)

DEFAULT_RELATIVE_DAMPING = 0.1
"""``c`` of ``λ = c · tr(F)/k`` (kronfluence's "0.1 × mean eigenvalues" heuristic)."""


class ProjectedFisherOptions(BaseModel):
    """Options of the ``projected-fisher`` Hessian."""

    model_config = ConfigDict(extra="forbid")
    damping: float = Field(
        DEFAULT_RELATIVE_DAMPING,
        ge=0.0,
        description="λ (absolute) or c in λ = c·tr(F)/k (relative; default 0.1, kronfluence's "
        "heuristic).",
    )
    damping_mode: Literal["absolute", "relative"] = Field(
        "relative", description="relative: λ = damping · mean eigenvalue of the projected Fisher."
    )
    max_memory_mb: float = Field(
        2048.0, gt=0.0, description="Memory allowed for the k×k float64 Fisher (and Φ)."
    )


class ProjectedFisherCurvature(Curvature):
    """Cholesky factor of ``F + λI`` (float64); ``solve(Q) = (F + λI)⁻¹ Q``."""

    def __init__(self, fisher: Tensor, damping: float, n_train: int, facts: dict[str, Any]) -> None:
        k = fisher.shape[0]
        self.fisher = fisher
        self.damping = float(damping)
        self.n_train = n_train
        self.facts = facts
        damped = fisher + self.damping * torch.eye(k, dtype=torch.float64, device=fisher.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:
            eig_min = float(torch.linalg.eigvalsh(damped).min())
            raise NumericalError(
                f"projected-fisher: F + λI with λ={self.damping:g} is not positive definite "
                f"(smallest eigenvalue {eig_min:.3e}, k={k}, N={n_train}); increase `damping` or "
                f"use damping_mode: relative"
            )
        self.chol = chol

    def solve(self, gradients: Tensor) -> Tensor:
        """``(n, k) -> (n, k)``: ``(F + λI)⁻¹`` applied to each row, in float64."""
        k = self.fisher.shape[0]
        if gradients.ndim != 2 or gradients.shape[1] != k:
            raise ValueError(
                f"projected gradients mismatch: expected (n, {k}), got {tuple(gradients.shape)}."
            )
        return torch.cholesky_solve(gradients.double().T, self.chol).T

    def describe(self) -> dict[str, Any]:
        """λ, k, N, tr(F)/k and the damping rule."""
        return {
            "damping": self.damping,
            "proj_dim": int(self.fisher.shape[0]),
            "n_train": self.n_train,
            **self.facts,
        }


class ProjectedFisher(HessianApproximation):
    """``F = (1/N) Σ_j (Φᵀg_j)(Φᵀg_j)ᵀ`` from compressed training gradients, ``+ λI``."""

    name = "projected-fisher"
    space = "compressed"

    def __init__(
        self,
        damping: float = DEFAULT_RELATIVE_DAMPING,
        damping_mode: str = "relative",
        max_memory_mb: float = 2048.0,
    ) -> None:
        if damping < 0:
            raise ConfigError(f"damping: {damping} < 0; give λ ≥ 0 (or c ≥ 0 if relative)")
        self.damping = float(damping)
        self.damping_mode = damping_mode
        self.max_memory_mb = max_memory_mb

    def fit(self, inputs: FitInputs) -> Curvature:
        """Accumulate ``F`` chunk by chunk (float64), resolve ``λ``, factor ``F + λI``.

        Raises:
            ConfigError: ``k×k`` float64 exceeds ``max_memory_mb``.
            NumericalError: ``λ = 0`` and ``F`` singular (``N < k``), or no training gradients.
        """
        t0 = time.perf_counter()
        if inputs.train_gradients is None:
            raise NumericalError("projected-fisher: no training gradients to fit on")
        stream = inputs.train_gradients
        shards = inputs.shards
        if shards is not None and (shards.count > 1 or shards.distributed):
            # Σ_shards Φᵀ G_sᵀ G_s Φ in shard order; each shard caches its compressed rows
            F, n = shards.reduce("fit", FisherRows(stream, self.max_memory_mb), stream.n_rows)
        else:
            F, n = FisherRows(stream, self.max_memory_mb, inputs.progress)(None)
        if F is None or n == 0:
            raise NumericalError("projected-fisher: no training gradients to fit on (N = 0)")
        F /= n
        k = F.shape[0]
        mean_eig = float(torch.trace(F)) / k
        lam = self.damping * mean_eig if self.damping_mode == "relative" else self.damping
        if lam == 0.0 and n < k:
            raise NumericalError(
                f"damping: 0 with N={n} training examples < proj_dim={k} leaves the projected "
                f"Fisher singular (rank ≤ {n}), so (F + λI)⁻¹ is undefined (traker's lambda_reg=0 "
                f"silently returns noise here); set damping > 0, use damping_mode: relative, or "
                f"proj_dim ≤ {n}"
            )
        facts = {
            "damping_mode": self.damping_mode,
            "damping_factor": self.damping,
            "mean_eigenvalue": mean_eig,
            "seconds_gradients_and_fisher": time.perf_counter() - t0,
        }
        t0 = time.perf_counter()
        curvature = ProjectedFisherCurvature(F, lam, n, facts)
        facts["seconds_cholesky"] = time.perf_counter() - t0
        return curvature


@dataclass(frozen=True)
class FisherRows:
    """Shard job: ``(Σ_{j∈rows} φ_j φ_jᵀ, |rows|)`` in float64 (``rows`` None: every row).

    Attributes:
        stream: the compressed training gradients.
        max_memory_mb: refuse a ``k×k`` float64 matrix larger than this.
        progress: progress bar (the unsharded pass).
    """

    stream: GradientStream
    max_memory_mb: float
    progress: bool = False

    def __call__(self, rows: slice | None) -> tuple[Tensor | None, int]:
        stream = self.stream if rows is None else self.stream.restrict(rows)
        F: Tensor | None = None
        n = 0
        for piece, T in stream.chunks(progress=self.progress, desc="fit: train gradients"):
            T64 = T.double()
            if F is None:
                k = T64.shape[1]
                mb = k * k * 8 / 2**20
                if mb > self.max_memory_mb:
                    raise ConfigError(
                        f"proj_dim: {k} needs a {k}×{k} float64 Fisher, {mb:.0f} MiB > "
                        f"max_memory_mb={self.max_memory_mb:g}; lower proj_dim or raise "
                        f"max_memory_mb"
                    )
                F = torch.zeros(k, k, dtype=torch.float64, device=T.device)
            F.addmm_(T64.T, T64)
            n += piece.stop - piece.start
        return F, n
