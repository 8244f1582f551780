"""Scorer ``logra``: influence with LoGra's Kronecker-structured gradient projection.

Choe et al. 2024, "What is your data worth to GPT? LLM-scale data valuation with influence
functions" (arXiv:2405.13954), §3. With ``φ(x) = Φ_LoGra ∇_θ f(θ, x)`` the per-layer projected
gradient of :mod:`attribution_logra.projection` (all layers concatenated, ``k = Σ_l k_out·k_in``),
computed from hooks (:mod:`attribution_logra.hooks`) without forming ``∇_θ f``::

    score_j(x') = φ_m(x')ᵀ (F_Φ + λI)⁻¹ φ_ℓ(x_j),      F_Φ = (1/N) Σ_j φ_ℓ(x_j) φ_ℓ(x_j)ᵀ

— the compressed-space Hessian (default ``projected-fisher``: the empirical Fisher in the
projected space, damped; ``hessian: null`` gives the identity). ``m`` is the query function
(default: the target), ``ℓ`` the train function (default ``loss``); sign as every method.

Why a scorer of its own: the core's influence scorer obtains training rows from a
``GradientStream``, which always forms the ``(n, p)`` per-example gradients before a compressor
sees them (``GradientCompressor.compress(G)``); "a source of compressed rows that never forms
``G``" is not expressible there. This scorer reuses everything else — the registered
compressed-space Hessian (fitted on the LoGra rows through ``FitInputs.train_gradients``), the
common-random-number noise streams, the score sink.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from attribution_core import (
    Batch,
    ConfigError,
    FitInputs,
    MethodParts,
    Phase,
    PlanSizes,
    Scorer,
    ScoringContext,
    Task,
    batch_size,
    select_parameters,
)
from attribution_logra.hooks import check_layout, projected_chunks
from attribution_logra.projection import LayerProjection, layer_projections


class LoGraOptions(BaseModel):
    """Options of the ``logra`` scorer."""

    model_config = ConfigDict(extra="forbid")
    proj_dim_in: int = Field(
        16, ge=1, description="k_in: rows of each layer's input projection (capped at d_in+1)."
    )
    proj_dim_out: int = Field(
        16, ge=1, description="k_out: rows of each layer's output-gradient projection (≤ d_out)."
    )
    projection: Literal["gaussian", "orthogonal"] = Field(
        "gaussian", description="gaussian: N(0,1/k) entries; orthogonal: scaled orthonormal rows."
    )
    check_layout: bool = Field(
        True, description="Check once that hook rows map to examples (one extra example)."
    )


class _Rows:
    """In-memory ``(n, k)`` rows in the form ``FitInputs.train_gradients`` has (``chunks()``)."""

    def __init__(self, matrix: Tensor, chunk_size: int) -> None:
        self.matrix, self.chunk_size = matrix, chunk_size

    def chunks(self, *, progress: bool = False, desc: str = "") -> Any:
        """Yield ``(rows, matrix[rows])``."""
        n = self.matrix.shape[0]
        for start in range(0, n, self.chunk_size):
            rows = slice(start, min(start + self.chunk_size, n))
            yield rows, self.matrix[rows]


class LoGraScorer(Scorer):
    """``φ_m(x')ᵀ (F_Φ + λI)⁻¹ φ_ℓ(x_j)`` with LoGra's per-layer projections ``φ``."""

    name = "logra"
    accepts = frozenset({"hessian"})
    gradient_based = True

    def __init__(self, parts: MethodParts, **options: Any) -> None:
        if parts.hessian is not None and parts.hessian.space != "compressed":
            raise ConfigError(
                f"{parts.label}.hessian: {parts.hessian.name!r} acts on parameter gradients, "
                f"which logra never forms; give a compressed-space hessian (projected-fisher) or "
                f"hessian: null (identity)"
            )
        self.parts = parts
        self.options = LoGraOptions(**options)

    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` LoGra influence scores, written into ``context.sink``."""
        layers = self._layers(model, context)
        train_fn = self.parts.train_function
        query_fn = self.parts.query_function or context.target
        common = {"seed": self.parts.seed, "chunk_size": context.chunk_size}
        if self.options.check_layout:
            for fn, data, stream in (
                (train_fn, task.train_data(), "train"),
                (query_fn, queries, "query"),
            ):
                check_layout(model, fn, data, layers, seed=self.parts.seed, stream=stream)

        t0 = time.perf_counter()
        T = self._stack(
            projected_chunks(model, train_fn, task.train_data(), layers, stream="train", **common),
            task.n_train,
        )
        context.timings["train_projected_gradients"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        Q = self._stack(
            projected_chunks(model, query_fn, queries, layers, stream="query", **common),
            batch_size(queries),
        )
        if self.parts.hessian is not None:
            params, _ = select_parameters(model)
            curvature = self.parts.hessian.fit(
                FitInputs(
                    model=model,
                    task=task,
                    train_function=train_fn,
                    seed=self.parts.seed,
                    params=params,
                    train_gradients=_Rows(T, context.chunk_size),  # type: ignore[arg-type]
                    cache_dir=context.cache_dir,
                    progress=context.progress,
                )
            )
            context.info["curvature"] = curvature.describe()
            Q = curvature.solve(Q)
        context.timings["fit_and_query"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        sink = context.sink(task.n_train, Q.shape[0], Q.dtype, Q.device)
        for start in range(0, task.n_train, context.chunk_size):
            rows = slice(start, min(start + context.chunk_size, task.n_train))
            sink.write(rows, T[rows].to(Q.dtype) @ Q.T)
        context.timings["scores"] = time.perf_counter() - t0
        return sink.result()

    def _layers(self, model: nn.Module, context: ScoringContext) -> list[LayerProjection]:
        params, excluded = select_parameters(model)
        if not params:
            raise ConfigError(
                f"method {self.parts.label!r}: the model has no Linear/Conv2d parameters to "
                f"attribute through; logra needs at least one"
            )
        opts = self.options
        layers = layer_projections(
            model,
            params,
            seed=self.parts.seed,
            proj_dim_in=opts.proj_dim_in,
            proj_dim_out=opts.proj_dim_out,
            kind=opts.projection,
        )
        context.info["parameters"] = {
            "included": len(params),
            "n_params": sum(p.numel() for p in params.values()),
            "excluded": excluded,
        }
        context.info["projection"] = {
            "kind": opts.projection,
            "proj_dim": sum(lay.dim for lay in layers),
            "layers": {lay.name: [lay.p_out.shape[0], lay.p_in.shape[0]] for lay in layers},
        }
        return layers

    @staticmethod
    def _stack(chunks: Any, n: int) -> Tensor:
        out: Tensor | None = None
        for rows, phi in chunks:
            if out is None:
                out = torch.empty(n, phi.shape[1], dtype=phi.dtype, device=phi.device)
            out[rows] = phi
        if out is None:
            raise ConfigError("logra: no examples to project")
        return out

    def plan(self, sizes: PlanSizes) -> list[Phase]:
        """Projected training rows (held in memory), query rows + fit, scores."""
        n, q, b = sizes.n_train, sizes.n_query, sizes.itemsize
        return [
            Phase("train_projected_gradients", n, (n, 0), 0, "hook-level LoGra rows (n, k)"),
            Phase("fit_and_query", q, (q, 0), 0, "projected query rows, hessian fit and solve"),
            Phase("scores", n, (n, q), n * q * b, "training rows · solved query rows"),
        ]
