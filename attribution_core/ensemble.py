"""``ensemble: {models: M}``: a gradient-based method averaged over independently trained models.

TRAK (Park et al. 2023, §3) averages its estimate over ``M`` models, each with its own
projection; any gradient-based method can be averaged the same way::

    scores = (1/M) Σ_m scores_m        (summed in float64)

Member 0 is the run's model with the method's seed; member ``m ≥ 1`` is ``task.base_model(seed
+ m)`` — trained on all of D once and cached under ``<cache_dir>/models`` — scored with seed
``seed + m`` for its own projection and Monte-Carlo draws, by a method built afresh for it (no
component is shared between members). With ``M = 1`` the result is the plain method's bit for
bit; with ``M = 2`` it is the mean of the plain method run on model seed ``s`` and on ``s + 1``
with method seeds ``s`` and ``s + 1``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from attribution_core.interfaces import (
    Batch,
    MemorySink,
    Phase,
    PlanSizes,
    Scorer,
    ScoringContext,
    Task,
)
from attribution_core.models import trained_model


class EnsembleScorer(Scorer):
    """Mean of a member scorer's scores over ``models`` independently trained models."""

    name = "ensemble"
    gradient_based = True

    def __init__(self, models: int, seed: int, member: Callable[[int], Scorer]) -> None:
        """Args: ``models`` = M; ``seed`` = the method's seed; ``member(m)`` builds member m."""
        self.models = models
        self.seed = seed
        self.member = member

    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` float64: the average of the members' scores."""
        total: Tensor | None = None
        members: list[dict[str, Any]] = []
        for m in range(self.models):
            seed = self.seed + m
            t0 = time.perf_counter()
            member_model = model if m == 0 else trained_model(task, seed, context.cache_dir)
            train_s = time.perf_counter() - t0
            sub = replace(context, timings={}, info={}, sink=MemorySink)  # members summed here
            s = self.member(m).scores(task, member_model, queries, sub).double()
            total = s if total is None else total + s
            for phase, secs in sub.timings.items():
                context.timings[phase] = context.timings.get(phase, 0.0) + secs
            if m:
                context.timings["ensemble_training"] = (
                    context.timings.get("ensemble_training", 0.0) + train_s
                )
            members.append({"seed": seed, "trained_here": m > 0, **sub.info})
        if total is None:
            raise ValueError(f"ensemble mismatch: expected models ≥ 1, got {self.models}.")
        context.info.update({k: v for k, v in members[0].items() if k != "seed"})
        context.info["ensemble"] = {"models": self.models, "members": members}
        return (total / self.models).to(torch.float64)

    def plan(self, sizes: PlanSizes) -> list[Phase]:
        """The member's phases, ``models`` times, after the ``models − 1`` trainings."""
        member = self.member(0).plan(sizes)
        train = Phase(
            "ensemble_training",
            (self.models - 1) * sizes.n_train,
            (),
            0,
            f"train {self.models - 1} more models on all of D",
        )
        return [train, *(replace(p, rows=p.rows * self.models) for p in member)]
