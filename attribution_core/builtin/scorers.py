"""Builtin scorers: ``influence`` (composes Hessian + compressor) and ``gradient-similarity``.

Influence composition (see the design):

* parameter space: ``q = C(H⁻¹ g_q)``, ``t = g_j``
* compressed space: ``q = H⁻¹ C(g_q)``, ``t = C(g_j)``

``scores[j, i] = t_j · q_i`` computed chunk by chunk over the training set.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from attribution_core.builtin.compressors import NoCompression
from attribution_core.builtin.hessians import IdentityHessian
from attribution_core.errors import ConfigError
from attribution_core.gradients import (
    GradientCache,
    gradient_chunks,
    layout_of,
    select_parameters,
    stack_gradients,
)
from attribution_core.interfaces import (
    Batch,
    GradientCompressor,
    Scorer,
    ScoringContext,
    Task,
    batch_size,
)
from attribution_core.methods import ResolvedMethod


class InfluenceOptions(BaseModel):
    """Options of the ``influence`` scorer."""

    model_config = ConfigDict(extra="forbid")
    cache_train_gradients: bool = Field(
        True, description="Cache (compressed) training gradients when the run has a cache_dir."
    )


class SimilarityOptions(BaseModel):
    """Options of the ``gradient-similarity`` scorer."""

    model_config = ConfigDict(extra="forbid")


class _GradientScorer(Scorer):
    """Shared set-up: parameters, measurements, compressor, cache."""

    def __init__(self, method: ResolvedMethod, **options: Any) -> None:
        self.method = method
        self.options = options

    def _setup(self, model: nn.Module, context: ScoringContext):
        params, excluded = select_parameters(model)
        if not params:
            raise ConfigError(
                f"method {self.method.label!r}: the model has no Linear/Conv2d parameters to "
                f"attribute through; influence methods need at least one"
            )
        layout = layout_of(params)
        context.info["parameters"] = {
            "included": len(layout),
            "n_params": sum(k for _, k in layout),
            "excluded": excluded,
        }
        compressor: GradientCompressor = self.method.compressor or NoCompression()
        compressor.fit(sum(k for _, k in layout), self.method.seed, layout=layout)
        context.info["compressor"] = compressor.describe()
        use_cache = context.cache_dir is not None and self.options.get(
            "cache_train_gradients", True
        )
        cache = GradientCache(context.cache_dir) if use_cache else None
        query_fn = self.method.query_function or context.target
        return params, compressor, cache, query_fn


class InfluenceScorer(_GradientScorer):
    """``score_j = C-composed ∇m(θ, x_q)ᵀ (H + λI)⁻¹ ∇ℓ(θ, x_j)`` (paper eq. 6)."""

    name = "influence"

    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` influence scores."""
        params, compressor, cache, query_fn = self._setup(model, context)
        train_fn = self.method.train_function
        hess = self.method.hessian or IdentityHessian()
        seed = self.method.seed
        compressed = hess.space == "compressed"
        data = task.train_data()

        def train_source(progress: bool = False, desc: str = "train gradients"):
            return gradient_chunks(
                model,
                train_fn,
                data,
                params,
                seed=seed,
                stream="train",
                chunk_size=context.chunk_size,
                progress=progress and context.progress,
                desc=desc,
                cache=cache,
                transform=compressor.compress if compressed else None,
                transform_key=compressor.describe() if compressed else None,
                transform_rows=compressor.preferred_rows() if compressed else 0,
            )

        t0 = time.perf_counter()
        curvature = hess.fit(
            model,
            task,
            train_fn,
            seed,
            params=params,
            train_gradients=lambda: train_source(True, "fit: train gradients"),
            cache_dir=context.cache_dir,
            progress=context.progress,
        )
        context.timings["fit"] = time.perf_counter() - t0
        context.info["curvature"] = curvature.describe()

        t0 = time.perf_counter()
        Gq = stack_gradients(
            gradient_chunks(
                model,
                query_fn,
                queries,
                params,
                seed=seed,
                stream="query",
                chunk_size=context.chunk_size,
                desc="query gradients",
            ),
            n=batch_size(queries),
        )
        Q = (
            curvature.solve(compressor.compress(Gq))
            if compressed
            else compressor.compress(curvature.solve(Gq))
        )
        del Gq  # only Q stays in memory during the training pass
        context.timings["query_gradients"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        out = torch.empty(task.n_train, Q.shape[0], dtype=Q.dtype, device=Q.device)
        for rows, T in train_source(True, "train gradients + scores"):
            out[rows] = T.to(Q.dtype) @ Q.T
            del T  # one training-gradient chunk alive at a time
        context.timings["train_gradients_and_scores"] = time.perf_counter() - t0
        return out


class GradientSimilarityScorer(_GradientScorer):
    """Cosine similarity of (compressed) gradients: ``cos(C(g_j), C(g_q))`` (no Hessian)."""

    name = "gradient-similarity"

    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` cosine similarities in [-1, 1]."""
        params, compressor, cache, query_fn = self._setup(model, context)
        seed = self.method.seed
        t0 = time.perf_counter()
        Q = compressor.compress(
            stack_gradients(
                gradient_chunks(
                    model,
                    query_fn,
                    queries,
                    params,
                    seed=seed,
                    stream="query",
                    chunk_size=context.chunk_size,
                ),
                n=batch_size(queries),
            )
        )
        Q = Q / Q.norm(dim=1, keepdim=True).clamp_min(torch.finfo(Q.dtype).tiny)
        context.timings["query_gradients"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = torch.empty(task.n_train, Q.shape[0], dtype=Q.dtype, device=Q.device)
        for rows, T in gradient_chunks(
            model,
            self.method.train_function,
            task.train_data(),
            params,
            seed=seed,
            stream="train",
            chunk_size=context.chunk_size,
            progress=context.progress,
            desc="train gradients + scores",
            cache=cache,
            transform=compressor.compress,
            transform_key=compressor.describe(),
            transform_rows=compressor.preferred_rows(),
        ):
            T = T / T.norm(dim=1, keepdim=True).clamp_min(torch.finfo(T.dtype).tiny)
            out[rows] = T.to(Q.dtype) @ Q.T
            del T
        context.timings["train_gradients_and_scores"] = time.perf_counter() - t0
        return out
