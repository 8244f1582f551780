"""Scorer ``tracin``: TracInCP (Pruthi et al. 2020, "Estimating Training Data Influence by
Tracing Gradient Descent", NeurIPS; eq. for TracInCP in §3.2).

With ``K`` checkpoints ``θ_1..θ_K`` of the base model's training (the task's
:meth:`attribution_core.Task.checkpoints` hook, every ``every`` steps, the last one the
attributed model) and ``η_k`` the learning rate in force at checkpoint ``k``::

    score_j(x') = Σ_k η_k ∇m(θ_k, x')ᵀ ∇ℓ(θ_k, x_j)                                (units: m·ℓ/θ²·η)

``m`` is the method's ``query_function`` (default: the run's target), ``ℓ`` its
``train_function`` (default ``loss``). With ``precondition: adam`` the training gradient is
multiplied by the checkpoint's Adam preconditioner (element-wise; ``t`` = Adam's step count)::

    P_k = 1 / (√(v_k / (1 − β₂ᵗ)) + ε),     score_j = Σ_k η_k ∇m(θ_k, x')ᵀ (P_k ⊙ ∇ℓ(θ_k, x_j))

A compressor ``C`` composes as in the influence scorer: a sketch (projection) on both sides,
``Σ_k η_k C(g_q)ᵀ C(P_k ⊙ g_j)``; ``int8`` on the query side only. Sign: positive = the
gradient steps on ``x_j`` lowered ``m`` on ``x'``, so removing ``x_j`` raises it. Under full-batch
gradient descent on ``L_D = (1/N) Σ_j ℓ_j`` with a checkpoint at every step, ``(1/N) Σ_{j∈S}
score_j`` is the first-order change of ``m`` from dropping ``S``'s terms from every step.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from attribution_core import (
    Batch,
    Checkpoint,
    ConfigError,
    GradientCache,
    GradientCompressor,
    GradientStream,
    MethodParts,
    NoCompression,
    Phase,
    PlanSizes,
    Scorer,
    ScoringContext,
    Task,
    layout_of,
    select_parameters,
)
from attribution_tracin.checkpoints import check_final_state, training_checkpoints


class TracInOptions(BaseModel):
    """Options of the ``tracin`` scorer."""

    model_config = ConfigDict(extra="forbid")
    every: int = Field(
        100, ge=1, description="Checkpoint every this many training steps (the last is kept)."
    )
    precondition: Literal["none", "adam"] = Field(
        "none", description="adam: apply each checkpoint's Adam preconditioner to ∇ℓ(θ_k, x_j)."
    )
    model_seed: int | None = Field(
        None, description="Seed the attributed model was trained from (None = the method seed)."
    )
    cache_checkpoints: bool = Field(
        True, description="Cache replayed checkpoints under cache_dir/checkpoints."
    )
    cache_train_gradients: bool = Field(
        False, description="Cache each checkpoint's training gradients (K·N·p floats on disk)."
    )


class TracInScorer(Scorer):
    """``score_j = Σ_k η_k ∇m(θ_k, x')ᵀ (P_k ⊙) ∇ℓ(θ_k, x_j)`` over training checkpoints."""

    name = "tracin"
    accepts = frozenset({"compressor"})
    gradient_based = True

    def __init__(self, parts: MethodParts, **options: Any) -> None:
        self.parts = parts
        self.options = TracInOptions(**options)

    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` float64 TracInCP scores, written into ``context.sink``."""
        opts = self.options
        seed = self.parts.seed if opts.model_seed is None else opts.model_seed
        t0 = time.perf_counter()
        cache_dir = context.cache_dir if opts.cache_checkpoints else None
        checkpoints, cached = training_checkpoints(
            task, seed, opts.every, adam=opts.precondition == "adam", cache_dir=cache_dir
        )
        check_final_state(model, checkpoints[-1], task, seed)
        if opts.precondition == "adam" and checkpoints[-1].exp_avg_sq is None:
            raise ConfigError(
                f"precondition: 'adam' but task {task.name!r} does not train with Adam (no "
                f"moments in its checkpoints); use precondition: none"
            )
        context.timings["checkpoints"] = time.perf_counter() - t0
        context.info["checkpoints"] = {
            "model_seed": seed,
            "every": opts.every,
            "steps": [ck.step for ck in checkpoints],
            "lr": [ck.lr for ck in checkpoints],
            "from_cache": cached,
            "precondition": opts.precondition,
        }
        compressor = self._compressor(model, context)
        t0 = time.perf_counter()
        total = torch.zeros(task.n_train, _n(queries), dtype=torch.float64, device=task.device)
        for ck in checkpoints:
            total += ck.lr * self._checkpoint_scores(task, model, ck, compressor, queries, context)
        context.timings["checkpoint_gradients_and_scores"] = time.perf_counter() - t0
        sink = context.sink(task.n_train, total.shape[1], total.dtype, total.device)
        sink.write(slice(0, task.n_train), total)
        return sink.result()

    def _compressor(self, model: nn.Module, context: ScoringContext) -> GradientCompressor:
        """The method's compressor fitted to the included parameters (one for all checkpoints)."""
        params, excluded = select_parameters(model)
        if not params:
            raise ConfigError(
                f"method {self.parts.label!r}: the model has no Linear/Conv2d parameters to "
                f"attribute through; tracin needs at least one"
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
        return compressor

    def _checkpoint_scores(
        self,
        task: Task,
        model: nn.Module,
        ck: Checkpoint,
        compressor: GradientCompressor,
        queries: Batch,
        context: ScoringContext,
    ) -> Tensor:
        """``(N, Q)`` float64: ``C(g_q)ᵀ C(P ⊙ g_j)`` at one checkpoint (without ``η_k``)."""
        net = copy.deepcopy(model)
        net.load_state_dict(ck.state)
        net.eval()
        params, _ = select_parameters(net)
        common = {"params": params, "seed": self.parts.seed, "chunk_size": context.chunk_size}
        query = GradientStream(
            net, self.parts.query_function or context.target, queries, stream="query", **common
        )
        Q = compressor.compress(query.stack(desc=f"query gradients, step {ck.step}"))
        use_cache = context.cache_dir is not None and self.options.cache_train_gradients
        train = GradientStream(
            net,
            self.parts.train_function,
            task.train_data(),
            stream="train",
            cache=GradientCache(context.cache_dir) if use_cache else None,
            **common,
        )
        side = _TrainSide(
            _preconditioner(ck, params) if self.options.precondition == "adam" else None,
            compressor if compressor.sketch else None,
            ck.step,
        )
        if side.active:
            train = train.compressed(side)
        out = torch.empty(task.n_train, Q.shape[0], dtype=torch.float64, device=Q.device)
        for rows, T in train.chunks(
            progress=context.progress, desc=f"train gradients, step {ck.step}"
        ):
            out[rows] = (T.to(Q.dtype) @ Q.T).double()
            del T
        return out

    def plan(self, sizes: PlanSizes) -> list[Phase]:
        """Checkpoint replay, then per checkpoint query and training gradients (K unknown)."""
        n, q, p, b = sizes.n_train, sizes.n_query, sizes.n_params, sizes.itemsize
        return [
            Phase(
                "checkpoints",
                sizes.train_steps,
                (),
                0,
                "replay the base model's training (K checkpoints)",
                cost="training-step",
            ),
            Phase(
                "checkpoint_gradients_and_scores",
                n + q,
                (n, q),
                n * q * 8 + (q + sizes.chunk_size) * p * b,
                f"per checkpoint: query and training gradients (chunks of {sizes.chunk_size})",
            ),
        ]


def _n(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


def _preconditioner(ck: Checkpoint, params: dict[str, Tensor]) -> Tensor:
    """``(p,)`` ``1/(√(v/(1−β₂ᵗ)) + ε)`` flattened in the parameter layout's order."""
    moments = ck.exp_avg_sq or {}
    missing = [k for k in params if k not in moments]
    if missing:
        raise ConfigError(
            f"precondition: 'adam' — checkpoint {ck.step} has no Adam moments for {missing[:3]}"
        )
    correction = 1.0 - ck.betas[1] ** ck.step
    parts = [1.0 / ((moments[k].double() / correction).sqrt() + ck.eps).reshape(-1) for k in params]
    return torch.cat(parts)


class _TrainSide:
    """The training-side transform ``g ↦ C(P ⊙ g)`` (duck-typed as a compressor).

    ``GradientStream.compressed`` accepts it; ``describe`` keys the gradient cache.
    """

    def __init__(
        self, precond: Tensor | None, sketch: GradientCompressor | None, step: int
    ) -> None:
        self.precond, self.sketch, self.step = precond, sketch, step
        self.active = precond is not None or sketch is not None

    def compress(self, gradients: Tensor) -> Tensor:
        """``(n, p) -> (n, k)``."""
        G = gradients
        if self.precond is not None:
            G = (G.double() * self.precond.to(G.device)).to(gradients.dtype)
        return self.sketch.compress(G) if self.sketch is not None else G

    def preferred_rows(self) -> int:
        """The sketch's preferred rows (0 without one)."""
        return self.sketch.preferred_rows() if self.sketch is not None else 0

    def describe(self) -> dict[str, Any]:
        """What identifies this transform in a cache key."""
        return {
            "precondition": "adam" if self.precond is not None else "none",
            "step": self.step,
            "sketch": self.sketch.describe() if self.sketch is not None else None,
        }
