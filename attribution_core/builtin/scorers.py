"""Builtin scorers: ``influence`` (composes Hessian + compressor) and ``gradient-similarity``.

Influence composition (see :mod:`attribution_core.composition`):

* parameter space: ``q = C(H⁻¹ g_q)``, ``t = g_j`` (``t = C(g_j)`` for a sketch ``C``)
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
from attribution_core.gradient_cache import GradientCache
from attribution_core.gradients import GradientStream, layout_of, select_parameters
from attribution_core.interfaces import (
    Batch,
    FitInputs,
    GradientCompressor,
    MethodParts,
    Phase,
    PlanSizes,
    Scorer,
    ScoringContext,
    Task,
)
from attribution_core.score_pass import score_queries


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
    """Shared set-up: parameters, measurements, compressor, gradient streams."""

    gradient_based = True

    def __init__(self, parts: MethodParts, **options: Any) -> None:
        self.parts = parts
        self.options = options

    def _setup(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> tuple[GradientCompressor, GradientStream, GradientStream]:
        """``(compressor, train stream, query stream)``; facts go to ``context.info``."""
        params, excluded = select_parameters(model)
        if not params:
            raise ConfigError(
                f"method {self.parts.label!r}: the model has no Linear/Conv2d parameters to "
                f"attribute through; influence methods need at least one"
            )
        layout = layout_of(params)
        context.info["parameters"] = {
            "included": len(layout),
            "n_params": sum(k for _, k in layout),
            "excluded": excluded,
        }
        compressor: GradientCompressor = self.parts.compressor or NoCompression()
        compressor.fit(sum(k for _, k in layout), self.parts.seed, layout=layout)
        context.info["compressor"] = compressor.describe()
        use_cache = context.cache_dir is not None and self.options.get(
            "cache_train_gradients", True
        )
        common = {"params": params, "seed": self.parts.seed, "chunk_size": context.chunk_size}
        train = GradientStream(
            model,
            self.parts.train_function,
            task.train_data(),
            stream="train",
            cache=GradientCache(context.cache_dir) if use_cache else None,
            **common,
        )
        query = GradientStream(
            model, self.parts.query_function or context.target, queries, stream="query", **common
        )
        return compressor, train, query


class InfluenceScorer(_GradientScorer):
    """``score_j = C-composed ∇m(θ, x_q)ᵀ (H + λI)⁻¹ ∇ℓ(θ, x_j)`` (paper eq. 6).

    Composition (:mod:`attribution_core.composition`): a parameter-space Hessian gives
    ``q = C(H⁻¹ g_q)`` with ``t = g_j`` — or ``t = C(g_j)`` when ``C`` is a sketch (a random
    projection); a compressed-space Hessian gives ``q = H⁻¹ C(g_q)``, ``t = C(g_j)``.
    """

    name = "influence"
    accepts = frozenset({"hessian", "compressor"})

    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` influence scores, written into ``context.sink``."""
        compressor, train, query = self._setup(task, model, queries, context)
        hess = self.parts.hessian or IdentityHessian()
        compressed = hess.space == "compressed"
        train_side = train.compressed(compressor) if compressed or compressor.sketch else train

        t0 = time.perf_counter()
        curvature = hess.fit(
            FitInputs(
                model=model,
                task=task,
                train_function=self.parts.train_function,
                seed=self.parts.seed,
                params=train.params,
                train_gradients=train.compressed(compressor) if compressed else train,
                cache_dir=context.cache_dir,
                progress=context.progress,
                shards=context.shards,
            )
        )
        context.timings["fit"] = time.perf_counter() - t0
        context.info["curvature"] = curvature.describe()

        def preconditioned(Gq: Tensor) -> Tensor:
            if compressed:
                return curvature.solve(compressor.compress(Gq))
            return compressor.compress(curvature.solve(Gq))

        return score_queries(task, query, train_side, preconditioned, context, normalise=False)

    def plan(self, sizes: PlanSizes) -> list[Phase]:
        """Fit, query gradients, training gradients + scores (sizes only; nothing runs)."""
        return gradient_plan(sizes, self.parts, fit=True)


class GradientSimilarityScorer(_GradientScorer):
    """Cosine similarity of gradients: ``cos(g_j, g_q)`` (no Hessian, no compressor)."""

    name = "gradient-similarity"

    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` cosine similarities in [-1, 1]."""
        compressor, train, query = self._setup(task, model, queries, context)

        def unit(Gq: Tensor) -> Tensor:
            Q = compressor.compress(Gq)
            return Q / Q.norm(dim=1, keepdim=True).clamp_min(torch.finfo(Q.dtype).tiny)

        train_side = train.compressed(compressor)
        return score_queries(task, query, train_side, unit, context, normalise=True)

    def plan(self, sizes: PlanSizes) -> list[Phase]:
        """Query gradients, training gradients + scores (sizes only; nothing runs)."""
        return gradient_plan(sizes, self.parts, fit=False)


def gradient_plan(sizes: PlanSizes, parts: MethodParts, *, fit: bool) -> list[Phase]:
    """The phases of a gradient scorer for ``sizes`` (``p`` parameters, ``k`` compressed)."""
    n, q, p, b = sizes.n_train, sizes.n_query, sizes.n_params, sizes.itemsize
    phases = []
    if fit and parts.hessian is not None:
        phases.append(parts.hessian.plan(sizes))
    kept = parts.compressor.plan_bytes(p, b) if parts.compressor is not None else 0
    held = f" + compressor {kept / 2**20:,.0f} MiB" if kept else ""
    phases += [
        Phase(
            "query_gradients",
            q,
            (q, p),
            q * p * b,
            f"per-example query gradients, solved{held}",
            held=kept,
        ),
        Phase(
            "train_gradients_and_scores",
            n,
            (n, q),
            (n * q + sizes.chunk_size * p) * b,
            f"per-example training gradients in chunks of {sizes.chunk_size}, scores{held}",
            held=kept,
        ),
    ]
    return phases
