"""Scorer ``metagradient``: exact derivatives of the query measurement through training.

MAGIC (Ilyas & Engstrom 2025, arXiv 2504.16430) with the REPLAY algorithm (Engstrom et al.
2025, arXiv 2503.13751): with per-example weights ``w`` (1 = trained on), the base model is
``θ_T(w)`` — the task's own training run replayed through its training-step hook — and::

    score_j(x') = −N · ∂m(θ_T(w), x')/∂w_j   at w = 1

so that removing a set ``S`` predicts ``m(θ_{D∖S}) − m(θ_D) ≈ (1/N) Σ_{j∈S} score_j`` to first
order *in the single-model sense* (same initialisation, same draws, removed slots weighted 0).
``m`` is the method's ``query_function`` (default: the run's target) with the run's **query**
noise stream (``example_noise(…, seed, "query", …)``), like every gradient method.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from attribution_core import (
    Batch,
    ConfigError,
    Measurement,
    MethodParts,
    Scorer,
    ScoringContext,
    Task,
    batch_size,
    example_noise,
    index_batch,
    require_training_steps,
)
from attribution_metagrad.replay import ReplayPlan, default_every, weight_gradients


class MetagradientOptions(BaseModel):
    """Options of the ``metagradient`` scorer."""

    model_config = ConfigDict(extra="forbid")
    checkpoint_every: int | None = Field(
        None, ge=1, description="Keep the training state every k steps (None: ⌈√T⌉)."
    )
    query_batch: int = Field(
        8, ge=1, description="Queries differentiated together in one reverse pass."
    )
    model_seed: int | None = Field(
        None, description="Seed the attributed model was trained from (None = the method seed)."
    )


class MetagradientScorer(Scorer):
    """``score_j = −N · ∂m(θ_T(w), x')/∂w_j`` by reverse mode through every training step."""

    name = "metagradient"

    def __init__(self, parts: MethodParts, **options: Any) -> None:
        self.parts = parts
        self.options = MetagradientOptions(**options)

    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` scores in the task's dtype, written into ``context.sink``."""
        opts = self.options
        recipe = require_training_steps(task, f"method {self.parts.label!r} (metagradient)")
        seed = self.parts.seed if opts.model_seed is None else opts.model_seed
        plan = ReplayPlan(
            recipe.steps, opts.checkpoint_every or default_every(recipe.steps), opts.query_batch
        )
        measurement = self.parts.query_function or context.target
        n_query = batch_size(queries)
        noise = example_noise(measurement, queries, self.parts.seed, "query", 0)
        weights = torch.ones(task.n_train, dtype=task.dtype, device=task.device)
        t0 = time.perf_counter()
        grads = weight_gradients(
            task,
            seed,
            weights,
            query_gradient_fn(model, measurement, queries, noise),
            n_query,
            plan,
            check_final=_checker(task, model, seed),
        )
        context.timings["metagradient"] = time.perf_counter() - t0
        context.info["metagradient"] = {
            "model_seed": seed,
            "steps": plan.steps,
            "checkpoint_every": plan.every,
            "query_batch": plan.query_batch,
            "states_held": plan.states_held(),
            "optimizer": recipe.optimizer.kind,
            "ema": recipe.ema_decay is not None,
        }
        out = -task.n_train * grads
        sink = context.sink(task.n_train, n_query, out.dtype, out.device)
        sink.write(slice(0, task.n_train), out)
        return sink.result()


def query_gradient_fn(model: nn.Module, measurement: Measurement, queries: Batch, noise: Batch):
    """``(θ, rows) -> {name: (Q_b, *shape)}``: ``∂m(θ, x'_q)/∂θ`` for the queries in ``rows``."""

    def gradients(params: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
        block = index_batch(queries, rows)
        nz = index_batch(noise, rows) if noise else {}

        def measure(p: dict[str, Tensor]) -> Tensor:
            def forward(*args: Any, **kwargs: Any) -> Tensor:
                return functional_call(model, p, args, kwargs)

            return measurement.evaluate(forward, block, nz)

        detached = {k: v.detach() for k, v in params.items()}
        return jacrev(measure)(detached)

    return gradients


def _checker(task: Task, model: nn.Module, seed: int):
    """``final parameters -> None``: refuse unless they are ``model``'s bit for bit.

    Raises:
        ConfigError: a parameter differs (names it and by how much).
    """

    def check(final: dict[str, Tensor]) -> None:
        for k, v in model.named_parameters():
            r = final[k].to(v.dtype)
            if r.shape != v.shape or not torch.equal(r, v.detach()):
                gap = (r.double() - v.detach().double()).abs().max() if r.shape == v.shape else "?"
                raise ConfigError(
                    f"metagradient: replayed final state mismatch: {k!r} differs from the "
                    f"attributed model (max abs {float(gap):.3g}); the model was not trained by "
                    f"task {task.name!r}'s recipe from seed {seed}: set the method's model_seed "
                    f"to the config's model.seed (and do not attribute model.path weights "
                    f"trained elsewhere)"
                )

    return check
