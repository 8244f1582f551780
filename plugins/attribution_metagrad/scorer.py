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
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from attribution_core import (
    Batch,
    ConfigError,
    Measurement,
    MethodParts,
    Phase,
    PlanSizes,
    Scorer,
    ScoringContext,
    Task,
    batch_size,
    data_fingerprint,
    example_noise,
    index_batch,
    require_training_steps,
)
from attribution_metagrad.budget import (
    MemoryEstimate,
    estimate_memory,
    pass_runs,
    query_residual_bytes,
    require_fits,
)
from attribution_metagrad.cache import ScoreCache, score_key_parts
from attribution_metagrad.replay import ReplayPlan, default_every, weight_gradients

QUERY_ROWS = 1024
"""Forward rows (query × Monte-Carlo draw) differentiated together for the query gradients:
measured on the digits U-Net, 32 queries × 256 draws at once peaked at 6.1 GB."""


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
    query_draws: Literal["query", "target"] = Field(
        "query",
        description="Noise of the query measurement: 'query' = the run's query stream (like "
        "every method); 'target' = the target stream, i.e. the very (t, ε) draws the suite's "
        "truth is measured with (an ablation: what knowing the draws adds).",
    )
    memory_limit_gb: float | None = Field(
        None,
        gt=0,
        description="Refuse (exit 2, before work) when the estimated peak exceeds this many "
        "GiB (None: the memory available when the method starts).",
    )
    cache_dir: str | None = Field(
        None,
        description="Cache the scores under <cache_dir>/metagradient/, keyed by base model, "
        "queries, measurement and draws (None: the run's cache_dir; no cache if neither).",
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
        if opts.query_draws == "target" and self.parts.query_function is not None:
            raise ConfigError(
                f"method {self.parts.label!r}: query_draws: target needs the run's target as the "
                f"query function (the target draws belong to it); remove query_function"
            )
        n_query = batch_size(queries)
        noise = example_noise(measurement, queries, self.parts.seed, opts.query_draws, 0)
        cache = ScoreCache(opts.cache_dir or context.cache_dir)
        parts = score_key_parts(
            task,
            model,
            queries,
            measurement,
            {"stream": opts.query_draws, "seed": self.parts.seed, "fingerprint": _print(noise)},
            {"model_seed": seed, "query_batch": min(opts.query_batch, n_query)},
        )
        info: dict[str, Any] = {
            "model_seed": seed,
            "steps": plan.steps,
            "checkpoint_every": plan.every,
            "query_batch": plan.query_batch,
            "states_held": plan.states_held(),
            "optimizer": recipe.optimizer.kind,
            "ema": recipe.ema_decay is not None,
            "query_draws": opts.query_draws,
        }
        context.info["metagradient"] = info
        out = cache.load(parts)
        info["cache"] = "off" if cache.root is None else ("hit" if out is not None else "miss")
        if out is None:
            out, info["memory_estimate"] = self._computed(
                task, model, queries, context, (seed, plan, measurement, noise)
            )
            cache.save(parts, out)
        out = out.to(task.dtype)
        sink = context.sink(task.n_train, n_query, out.dtype, out.device)
        sink.write(slice(0, task.n_train), out)
        return sink.result()

    def plan(self, sizes: PlanSizes) -> list[Phase]:
        """One pass: ``pass_runs(Q, query_batch)`` training runs of ``T`` steps (timed by the
        plan's measured training step); its memory is estimated and checked when it starts."""
        n, q, steps = sizes.n_train, sizes.n_query, sizes.train_steps
        runs = pass_runs(q, self.options.query_batch)
        what = (
            f"forward run, query gradients and reverse walk through {steps} steps: about "
            f"{runs:.0f} training runs (0 on a cache hit); peak memory checked when it starts"
            if steps
            else "the task has no training-step hook: the method will refuse it"
        )
        return [
            Phase(
                "metagradient",
                round(runs * steps),
                (n, q),
                2 * n * q * 8,
                what,
                cost="training-step",
            )
        ]

    def _computed(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext, how: tuple
    ) -> tuple[Tensor, dict[str, float]]:
        """Estimate memory (refuse if too much), then the reverse pass.

        Returns:
            ``(−N · ∂m/∂w: (N, Q), the memory estimate in GiB with the limit used)``.
        """
        seed, plan, measurement, noise = how
        n_query = batch_size(queries)
        weights = torch.ones(task.n_train, dtype=task.dtype, device=task.device)
        estimate = pass_estimate(task, seed, model, measurement, queries, noise, plan)
        limit = require_fits(estimate, self.options.memory_limit_gb)
        t0 = time.perf_counter()
        grads = weight_gradients(
            task,
            seed,
            weights,
            query_gradient_fn(model, measurement, queries, noise),
            n_query,
            plan,
            check_final=_checker(task, model, seed),
            progress=context.progress,
        )
        context.timings["metagradient"] = time.perf_counter() - t0
        return -task.n_train * grads, {**estimate.describe(), "limit_gib": limit}


def query_gradient_fn(model: nn.Module, measurement: Measurement, queries: Batch, noise: Batch):
    """``(θ, rows) -> {name: (Q_b, *shape)}``: ``∂m(θ, x'_q)/∂θ`` for the queries in ``rows``.

    Per query (``vmap(grad)``, like :func:`attribution_core.per_example_gradients`), in
    sub-blocks of :func:`query_chunk` queries: memory is the forward and backward of at most
    ``QUERY_ROWS`` (query, draw) rows at a time, whatever ``Q_b`` and the draw count.
    """

    def single(p: dict[str, Tensor], example: Batch, nz: Batch) -> Tensor:
        def forward(*args: Any, **kwargs: Any) -> Tensor:
            return functional_call(model, p, args, kwargs)

        ex1 = {k: v.unsqueeze(0) for k, v in example.items()}
        nz1 = {k: v.unsqueeze(0) for k, v in nz.items()}
        return measurement.evaluate(forward, ex1, nz1)[0]

    per_grad = vmap(grad(single), in_dims=(None, 0, 0))
    step = query_chunk(measurement)

    def gradients(params: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
        detached = {k: v.detach() for k, v in params.items()}
        parts = []
        for a in range(rows.start, rows.stop, step):
            sub = slice(a, min(a + step, rows.stop))
            nz = index_batch(noise, sub) if noise else {}
            parts.append(per_grad(detached, index_batch(queries, sub), nz))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    return gradients


def pass_estimate(
    task: Task,
    seed: int,
    model: nn.Module,
    measurement: Measurement,
    queries: Batch,
    noise: Batch,
    plan: ReplayPlan,
) -> MemoryEstimate:
    """The memory estimate of one reverse pass at weights 1 over ``queries``: one probe training
    step and the probe of the first query sub-block (``min(query_chunk, query_batch, Q)``)."""
    n_query = batch_size(queries)
    first = slice(0, min(query_chunk(measurement), plan.query_batch, n_query))
    probe = query_residual_bytes(model, measurement, queries, noise, first)
    weights = torch.ones(task.n_train, dtype=task.dtype, device=task.device)
    return estimate_memory(
        task, seed, weights, (plan.states_held(), n_query, plan.query_batch), probe
    )


def query_chunk(measurement: Measurement) -> int:
    """Queries per query-gradient sub-block: ``QUERY_ROWS`` forward rows (query × draw)."""
    return max(1, QUERY_ROWS // max(1, int(measurement.n_samples)))


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


def _print(noise: Batch) -> str | None:
    """Fingerprint of the drawn query noise (None for a deterministic measurement)."""
    return data_fingerprint(noise) if noise else None
