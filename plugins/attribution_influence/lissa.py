"""Hessian ``lissa``: stochastic Neumann-series inverse-GGN products (LiSSA).

Agarwal, Bullins, Hazan, "Second-Order Stochastic Optimization for Machine Learning in Linear
Time", JMLR 2017 (Alg. 1, "LiSSA"); used for influence by Koh & Liang, "Understanding Black-box
Predictions via Influence Functions", ICML 2017. With ``A = H + λ_tot I`` (``λ_tot = λ + 2·l2``,
the task's regulariser) and a scale ``s``, for each right-hand side ``b = g_q``:

    v_0 = b,    v_k = b + (I − (H_{S_k} + λ_tot I)/s) v_{k−1},   k = 1..depth,
    solve(b) = (1/repeats) Σ_repeats v_depth / s,

where ``H_{S_k}`` is the GGN of a fresh uniformly drawn minibatch ``S_k`` of ``batch_size``
rows of the task's curvature problem (pass 0, :mod:`attribution_influence.ggn`; unbiased:
``E[H_S] = H``). With full batches ``v_depth/s = (1/s) Σ_{i=0}^{depth} (I − A/s)^i b``, the
truncated Neumann series of ``A⁻¹`` — curvlinops' ``NeumannInverseLinearOperator(A,
num_terms=depth, scale=1/s)`` — whose relative error along an eigenvector of ``A`` with
eigenvalue ``a`` is ``(1 − a/s)^{depth+1}``, largest for the smallest ``a ≥ λ_tot``. It converges
iff ``0 < a < 2s`` for all eigenvalues (of every minibatch GGN, for the stochastic version).

Seeds: the minibatch sequence of repeat ``r`` comes from a generator seeded by
``(FitInputs.seed, r)``, re-created for every ``solve`` call, so every right-hand side — in
every chunk and every call — sees the same sequence: ``solve`` is one fixed random linear map.

Cost: ``repeats · depth`` minibatch GGN products per block of ``max_columns`` right-hand
sides, i.e. about ``repeats · depth · batch_size · n_query`` row forward+backward passes, plus
``scale: auto``'s 20 full-data products; memory: the ``(p, n_query)`` iterates in float64.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attribution_core import (
    Curvature,
    FitInputs,
    NumericalError,
)
from attribution_influence.ggn import GGNHessian, GGNProducts
from attribution_influence.krylov import arnoldi

SCALE_STEPS = 20
"""Arnoldi steps of the ``scale: auto`` estimate of ``λ_max(H)`` (full data)."""


class LiSSAOptions(BaseModel):
    """Options of the ``lissa`` Hessian."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    damping: float = Field(
        0.01,
        ge=0.0,
        description="λ in (H + λI)⁻¹, absolute in the units of L_D (the task's 2·l2 is added).",
    )
    depth: int | Literal["auto"] = Field(
        "auto",
        description="Recursion depth (Neumann terms); auto: the smallest with truncation "
        "factor (1 − λ_tot/s)^(depth+1) ≤ tol, at most max_depth.",
    )
    tol: float = Field(
        1e-2, gt=0.0, lt=1.0, description="Truncation factor that depth: auto aims for."
    )
    max_depth: int = Field(1000, ge=1, description="Upper bound of depth: auto.")
    scale: float | Literal["auto"] = Field(
        "auto",
        description="s (must exceed λ_max(H_S + λ_tot I)/2); auto: scale_factor · (λ_max(H) + "
        "λ_tot), λ_max from 20 Arnoldi steps on the full GGN.",
    )
    scale_factor: float = Field(
        1.5, ge=1.0, description="Margin of scale: auto over the full-data λ_max."
    )
    repeats: int = Field(1, ge=1, description="Independent recursions averaged.")
    batch_size: int | None = Field(
        128, ge=1, description="Rows per minibatch GGN (None or ≥ rows: full batch, exact)."
    )
    n_samples: int | None = Field(
        None,
        ge=1,
        description="Monte-Carlo draws per training example in the GGN (None: the "
        "train_function's n_samples).",
    )
    max_columns: int = Field(32, ge=1, description="Right-hand sides iterated together.")
    max_rows: int = Field(256, ge=1, description="Rows per vectorised GGN product (memory).")


def resolve_depth(opts: LiSSAOptions, total_damping: float, scale: float) -> int:
    """``depth`` as set, or the smallest with ``(1 − λ_tot/s)^(depth+1) ≤ tol`` (≤ max_depth)."""
    if opts.depth != "auto":
        return int(opts.depth)
    rate = 1.0 - total_damping / scale
    if rate <= 0.0:
        return 1
    if rate >= 1.0:
        return opts.max_depth
    return max(1, min(opts.max_depth, math.ceil(math.log(opts.tol) / math.log(rate)) - 1))


class LiSSACurvature(Curvature):
    """``solve(G)``: the LiSSA recursion (module doc) on every row of ``G``.

    Args:
        ggn: minibatch GGN products.
        damping: λ (absolute); ``total_damping`` adds the task's ``2·l2``.
        l2: the task's ``l2``.
        scale: ``s``.
        depth: recursion depth.
        options: repeats, batch_size and max_columns are used.
        seed: seed of the minibatch sequences.
        info: facts for ``describe()``.
    """

    def __init__(
        self,
        ggn: GGNProducts,
        damping: float,
        l2: float,
        scale: float,
        depth: int,
        options: LiSSAOptions,
        seed: int,
        info: dict[str, Any],
    ) -> None:
        self.ggn = ggn
        self.damping, self.total_damping = float(damping), float(damping) + 2.0 * float(l2)
        self.scale, self.depth, self.seed = float(scale), int(depth), int(seed)
        self.repeats, self.max_columns = options.repeats, options.max_columns
        bs = options.batch_size
        self.batch_size = None if bs is None or bs >= ggn.n_rows else int(bs)
        self.info = dict(info)

    def _recursion(self, B: Tensor, repeat: int) -> Tensor:
        """``v_depth / s`` for right-hand sides ``B: (p, m)`` float64, one repeat."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + repeat)
        V = B.clone()
        for k in range(self.depth):
            rows = None
            if self.batch_size is not None:
                rows = torch.randperm(self.ggn.n_rows, generator=gen)[: self.batch_size]
            AV = self.ggn.matmat(V, rows) + self.total_damping * V
            V = B + V - AV / self.scale
            if (k + 1) % 100 == 0 or k + 1 == self.depth:
                self._check(V, B, k + 1)
        return V / self.scale

    def _check(self, V: Tensor, B: Tensor, step: int) -> None:
        """Refuse a diverging recursion (non-finite, or ‖v‖ > 1e6 · (step+1) · ‖b‖)."""
        bound = 1e6 * (step + 1) * float(B.norm())
        if not bool(torch.isfinite(V).all()) or float(V.norm()) > bound:
            raise NumericalError(
                f"hessian lissa: the recursion diverged at step {step} (scale {self.scale:g}); "
                f"s must exceed λ_max(H_S + λI)/2 for every minibatch: raise scale (or use "
                f"scale: auto with a larger scale_factor / batch_size)"
            )

    def solve(self, gradients: Tensor) -> Tensor:
        """``(n, p) -> (n, p)``: LiSSA's ``(H + λ_tot I)⁻¹`` estimate on every row."""
        p = self.ggn.n_params
        if gradients.ndim != 2 or gradients.shape[1] != p:
            raise ValueError(
                f"gradients mismatch: expected (n, {p}), got {tuple(gradients.shape)}."
            )
        G = gradients.to(torch.float64)
        out = torch.zeros_like(G)
        for a in range(0, G.shape[0], self.max_columns):
            B = G[a : a + self.max_columns].T.contiguous()
            for r in range(self.repeats):
                out[a : a + B.shape[1]] += self._recursion(B, r).T
        return (out / self.repeats).to(gradients.dtype)

    def describe(self) -> dict[str, Any]:
        """Damping, scale, depth, the truncation factor and the products used so far."""
        return {
            "damping": self.damping,
            "total_damping": self.total_damping,
            "scale": self.scale,
            "depth": self.depth,
            "repeats": self.repeats,
            "batch_size": self.batch_size or self.ggn.n_rows,
            "truncation_factor": (1.0 - self.total_damping / self.scale) ** (self.depth + 1),
            "fit_ggn_vector_products": self.ggn.products,
            "solve_ggn_vector_products_per_query": self.repeats
            * self.depth
            * (self.batch_size or self.ggn.n_rows)
            / self.ggn.n_rows,
            **self.info,
        }


class LiSSAHessian(GGNHessian):
    """LiSSA's stochastic inverse-GGN products (module doc).

    Args:
        **options: the fields of :class:`LiSSAOptions`.

    Raises:
        ConfigError: an option is unknown or out of range.
    """

    name = "lissa"

    options_model = LiSSAOptions

    def fit(self, inputs: FitInputs) -> LiSSACurvature:
        """Materialise the rows, resolve ``scale`` and ``depth``; the recursion runs in solve."""
        opts = self.options
        t0 = time.perf_counter()
        n_samples, ggn = self.products(inputs)
        total_damping = opts.damping + 2.0 * inputs.task.l2
        info: dict[str, Any] = {"n_samples": n_samples, "n_params": ggn.n_params}
        scale = opts.scale
        if scale == "auto":
            steps = min(SCALE_STEPS, ggn.n_params)
            lam_max = float(arnoldi(ggn.matmat, ggn.n_params, steps, inputs.seed).values[0])
            info["lambda_max_estimate"] = lam_max
            scale = opts.scale_factor * (lam_max + total_damping)
        depth = resolve_depth(opts, total_damping, float(scale))
        truncation = (1.0 - total_damping / float(scale)) ** (depth + 1)
        if truncation > opts.tol:
            warnings.warn(
                f"hessian lissa: depth {depth} leaves truncation factor {truncation:.2e} > tol "
                f"{opts.tol:g} (damping {total_damping:g} ≪ scale {float(scale):g}); raise "
                f"damping or max_depth for a converged (H + λI)⁻¹",
                RuntimeWarning,
                stacklevel=2,
            )
        info["setup_seconds"] = time.perf_counter() - t0
        return LiSSACurvature(
            ggn, opts.damping, inputs.task.l2, float(scale), depth, opts, inputs.seed, info
        )
