"""Scorer ``ensemble-influence`` and method ``trak-ensemble``: TRAK averaged over models.

TRAK (Park et al. 2023, §3) averages its estimate over ``M`` independently trained models, each
with its own projection. Here::

    scores = (1/M) Σ_m scores_m,   scores_m = influence(model_m, Φ_m, F_m)  (the ``influence``
                                                                            scorer, unchanged)

Member 0 is the run's model with the method's seed; member ``m ≥ 1`` is
``task.base_model(seed + m)`` (trained here, on all of D) with seed ``seed + m`` for its
projection and Monte-Carlo draws. With ``models: 1`` the result is ``trak``'s bit for bit.
Off by default: ``trak`` and ``d-trak`` attribute one model; use ``trak-ensemble`` or set the
scorer yourself.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from attribution_core import Scorer, ScoringContext, Task
from attribution_core.builtin.scorers import InfluenceOptions, InfluenceScorer
from attribution_core.interfaces import Batch
from attribution_core.methods import ResolvedMethod


class EnsembleOptions(InfluenceOptions):
    """Options of the ``ensemble-influence`` scorer."""

    models: int = Field(
        1, ge=1, description="M: models averaged (member m ≥ 1 trained from seed + m)."
    )


class EnsembleInfluenceScorer(Scorer):
    """Mean of ``influence`` scores over ``M`` independently trained models and projections."""

    name = "ensemble-influence"

    def __init__(
        self, method: ResolvedMethod, models: int = 1, cache_train_gradients: bool = True
    ) -> None:
        self.method = method
        self.models = models
        self.cache_train_gradients = cache_train_gradients

    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)``: the average of the members' influence scores."""
        total: Tensor | None = None
        members: list[dict[str, Any]] = []
        for m in range(self.models):
            seed = self.method.seed + m
            t0 = time.perf_counter()
            member = model if m == 0 else task.base_model(seed).eval()
            train_s = time.perf_counter() - t0
            sub = dataclasses.replace(context, seed=seed, timings={}, info={})
            scorer = InfluenceScorer(
                dataclasses.replace(self.method, seed=seed),
                cache_train_gradients=self.cache_train_gradients,
            )
            s = scorer.scores(task, member, queries, sub).double()
            total = s if total is None else total + s
            for phase, secs in sub.timings.items():
                context.timings[phase] = context.timings.get(phase, 0.0) + secs
            if m:
                context.timings["ensemble_training"] = (
                    context.timings.get("ensemble_training", 0.0) + train_s
                )
            members.append({"seed": seed, "trained_here": m > 0, **sub.info})
        assert total is not None  # models ≥ 1 (validated)
        context.info.update({k: v for k, v in members[0].items() if k not in ("seed",)})
        context.info["ensemble"] = {"models": self.models, "members": members}
        return (total / self.models).to(torch.float64)
