"""The ``exact-retraining`` scorer: leave-one-out scores and the retrained-subset oracle.

Scores (same scale as influence, so ``predict_subsets``' ``1/N`` applies alike)::

    score[j, q] = N · (1/K) Σ_k [ m(θ_{−j}^{(k)}, x'_q) − m(θ^{(k)}, x'_q) ]

``θ^{(k)}`` is trained on all of D and ``θ_{−j}^{(k)}`` without ``x_j``, both from the same seed
``s_k = method seed + k`` (paired); ``m`` is the run's target, evaluated on every model with the
same per-query Monte-Carlo draws (``example_noise(target, queries, method seed, "target", 0)``).
Rows of training examples outside ``indices`` are **NaN** (not computed), recorded in the manifest.

``predict_subsets(masks, scores, oracle=...)`` returns the suite's stored oracle when the harness
passes it; otherwise it trains one model per mask (seed ``oracle_seed``, distinct from the method's
LOO seeds and the suite's truth seeds) and returns ``m(θ_mask) − m(θ_full)`` with ``θ_full`` from
the same seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from attribution_core import (
    Batch,
    ConfigError,
    DataError,
    Executor,
    LocalExecutor,
    Measurement,
    MethodParts,
    Scorer,
    ScoringContext,
    Task,
    batch_size,
    cache_key,
    example_noise,
)
from attribution_retrain.jobs import ModelSpec, RetrainStore, key_parts, mask_name, retrain


class RetrainOptions(BaseModel):
    """Options of the ``exact-retraining`` scorer."""

    model_config = ConfigDict(extra="forbid")
    seeds: int = Field(
        1, ge=1, description="Paired seeds per left-out example (scores average them)."
    )
    indices: list[int] | None = Field(
        None, description="Training indices to leave out (default: all); other rows are NaN."
    )
    models_per_job: int = Field(
        8,
        ge=1,
        description="Models trained together by one train_ensemble call (one executor job).",
    )
    oracle_seed: int = Field(
        1_000_003,
        description="Seed of the per-mask models of predict_subsets when no oracle is passed "
        "(keep it distinct from the suite's truth seeds).",
    )
    store_dir: str | None = Field(
        None, description="Where finished retrainings are kept (default: <cache_dir>/retrain)."
    )


@dataclass
class _Run:
    """What ``predict_subsets`` needs from the last ``scores`` call to retrain on masks."""

    task: Task
    target: Measurement
    queries: Batch
    noise: Batch
    store: RetrainStore
    executor: Executor
    chunk_size: int
    progress: bool


class ExactRetrainingScorer(Scorer):
    """Leave-one-out retraining (``scores``) and the per-mask retraining oracle."""

    name = "exact-retraining"
    uses_oracle = True

    def __init__(self, parts: MethodParts, **options: Any) -> None:
        self.parts = parts
        self.options = RetrainOptions(**options)
        self._run: _Run | None = None
        self.stats: dict[str, Any] = {}

    # ---- set-up ------------------------------------------------------------------------------
    def _prepare(self, task: Task, queries: Batch, context: ScoringContext) -> _Run:
        root = self.options.store_dir or (
            str(Path(context.cache_dir) / "retrain") if context.cache_dir is not None else None
        )
        parts = key_parts(task, context.target, queries, self.parts.seed)
        store = RetrainStore(None if root is None else Path(root) / cache_key(**parts), parts)
        noise = example_noise(context.target, queries, self.parts.seed, "target", 0)
        executor = context.executor if context.executor is not None else LocalExecutor()
        return _Run(
            task,
            context.target,
            queries,
            noise,
            store,
            executor,
            context.chunk_size,
            context.progress,
        )

    def leave_out_indices(self, n_train: int) -> list[int]:
        """The training indices whose rows are computed (validated against ``N``)."""
        if self.options.indices is None:
            return list(range(n_train))
        idx = self.options.indices
        bad = [i for i in idx if not 0 <= i < n_train]
        if bad or len(set(idx)) != len(idx):
            raise ConfigError(
                f"method {self.parts.label!r}.indices: expected distinct training indices in "
                f"0..{n_train - 1}, got {'out-of-range ' + str(bad[:5]) if bad else 'duplicates'}; "
                f"fix the list or leave it unset for all examples"
            )
        return sorted(idx)

    # ---- scores ------------------------------------------------------------------------------
    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)``: ``N · mean_k[m(θ_{−j}) − m(θ)]``; rows outside ``indices`` NaN.

        ``model`` is not used: every seed retrains its own full model so the difference is paired.
        """
        n = task.n_train
        rows = self.leave_out_indices(n)
        run = self._run = self._prepare(task, queries, context)
        seeds = [self.parts.seed + k for k in range(self.options.seeds)]
        specs = []
        for s in seeds:
            if rows:  # indices: [] trains nothing (e.g. bench, where only the oracle is read)
                specs.append(ModelSpec(f"seed{s}-full", s, np.ones(n)))
            for j in rows:
                w = np.ones(n)
                w[j] = 0.0
                specs.append(ModelSpec(f"seed{s}-loo{j}", s, w))
        t0 = time.perf_counter()
        results, stats = retrain(
            specs,
            task=task,
            target=run.target,
            queries=queries,
            noise=run.noise,
            store=run.store,
            executor=run.executor,
            models_per_job=self.options.models_per_job,
            chunk_size=run.chunk_size,
            progress=run.progress,
            desc="leave-one-out retraining",
        )
        context.timings["retrain"] = time.perf_counter() - t0
        q = batch_size(queries)
        out = np.full((n, q), np.nan)
        for j in rows:
            diffs = [results[f"seed{s}-loo{j}"] - results[f"seed{s}-full"] for s in seeds]
            out[j] = n * np.mean(diffs, axis=0)
        self.stats = stats
        context.info["exact_retraining"] = {
            "seeds": seeds,
            "computed_indices": rows if self.options.indices is not None else "all",
            "uncomputed_rows": "NaN",
            "store": None if run.store.root is None else str(run.store.root),
            "noise_seed": self.parts.seed,
            **stats,
        }
        return torch.as_tensor(out, dtype=torch.float64)

    # ---- subsets -----------------------------------------------------------------------------
    def predict_subsets(
        self,
        masks: Tensor,
        scores: Tensor,
        *,
        oracle: Tensor | None = None,
        removed_weight: float = 0.0,
    ) -> Tensor:
        """``(M, Q)``: the suite's ``oracle`` if given, else ``m(θ_mask) − m(θ_full)`` retrained.

        ``removed_weight`` is ignored: the oracle models were retrained with it (no first-order
        factor applies to a retrained model).

        Raises:
            DataError: ``masks``/``oracle`` shapes disagree with ``scores``.
            ConfigError: no oracle and no prior :meth:`scores` call to take the task from.
        """
        n, q = scores.shape
        if masks.ndim != 2 or masks.shape[1] != n:
            raise DataError(
                f"masks mismatch: expected (M, {n}) for {n} training examples, got "
                f"{tuple(masks.shape)}"
            )
        if oracle is not None:
            if tuple(oracle.shape) != (masks.shape[0], q):
                raise DataError(
                    f"oracle mismatch: expected ({masks.shape[0]}, {q}) = (masks, queries), got "
                    f"{tuple(oracle.shape)}; rebuild the suite's oracle/ for these masks"
                )
            return torch.as_tensor(oracle).to(scores.dtype)
        if self._run is None:
            raise ConfigError(
                f"method {self.parts.label!r}: predict_subsets without a stored oracle retrains "
                f"on the task of a previous scores() call; call scores() first or pass oracle="
            )
        return self.retrain_subsets(masks)

    def retrain_subsets(self, masks: Tensor) -> Tensor:
        """Train one model per mask (seed ``oracle_seed``): ``(M, Q)`` ``m(θ_mask) − m(θ_full)``."""
        run = self._run
        assert run is not None  # checked by predict_subsets
        s = self.options.oracle_seed
        kept = masks.detach().cpu().numpy().astype(bool)
        names = [mask_name(s, row) for row in kept]
        specs = [ModelSpec(f"seed{s}-full", s, np.ones(kept.shape[1]))]
        specs += [
            ModelSpec(nm, s, row.astype(np.float64)) for nm, row in zip(names, kept, strict=True)
        ]
        results, stats = retrain(
            specs,
            task=run.task,
            target=run.target,
            queries=run.queries,
            noise=run.noise,
            store=run.store,
            executor=run.executor,
            models_per_job=self.options.models_per_job,
            chunk_size=run.chunk_size,
            progress=run.progress,
            desc="subset retraining",
        )
        self.stats = stats
        full = results[f"seed{s}-full"]
        return torch.as_tensor(np.stack([results[nm] - full for nm in names]), dtype=torch.float64)
