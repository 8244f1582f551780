"""DAS, the Diffusion Attribution Score (Lin et al., arXiv 2410.18639v4).

DAS scores a training example by how far removing it moves the noise predictor's *output* on
the query (the KL between the two models' reverse kernels, ∝ ‖ε_θ − ε_{θ∖i}‖²), with

1. the output linearised in θ: ``ε_{θ∖i}(x'_t, t) ≈ ε_θ(x'_t, t) + J'_t (θ∖i − θ)``;
2. ``θ∖i − θ`` one Newton step on the linearised least-squares objective without example i —
   exact for linear least squares, with the leverage correction ``1 / (1 − h_i)``.

Written in the framework's pieces (``docs/methods/das.md`` has the equations and the choices):

* training rows ``a_i = Φᵀ ∇_θ f_i`` and residuals ``e_i``, where ``f_i = S^{-1/2} Σ_s v_sᵀ
  ε_θ(x_{t_s}, t_s)`` sketches the ``S·D`` outputs of example i with Rademacher ``v_s``
  (measurement ``das-output``; ``E[a_i a_iᵀ]`` is the example's GGN block in projected space)
  and ``e_i = S^{-1/2} Σ_s v_sᵀ (ε_s − ε_θ)``;
* ``A = Σ_i a_i a_iᵀ + λI``, ``h_i = a_iᵀ A⁻¹ a_i``, ``δ_i = A⁻¹ a_i e_i / (1 − h_i)``
  (:func:`leave_one_out_steps`; exactly ridge regression's leave-one-out change);
* query rows ``ψ_{q,r} = Φᵀ ∇_θ v_rᵀ ε_θ(x'_{t_r}, t_r)``, ``r = 1..m`` one draw each:
  ``score[i, q] = (1/m) Σ_r (ψ_{q,r}ᵀ δ_i)²`` ≈ ``E_{t,ε} ‖ε_{θ∖i}(x'_t, t) − ε_θ(x'_t, t)‖²``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from attribution_diffusion.measurements import EpsMeasurement
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from attribution_core import (
    Batch,
    ConfigError,
    Forward,
    GradientCache,
    GradientStream,
    MethodParts,
    NoCompression,
    NumericalError,
    Phase,
    PlanSizes,
    Scorer,
    ScoringContext,
    Task,
    batch_size,
    example_noise,
    index_batch,
    layout_of,
    select_parameters,
)
from attribution_diffusion_methods.journey import diffusion_schedule

MAX_K = 16_384
"""Largest feature dimension whose ``k × k`` float64 system DAS solves (2 GiB)."""


# ---- the output sketch --------------------------------------------------------------------------
class DASOutputOptions(BaseModel):
    """Options of ``das-output``."""

    model_config = ConfigDict(extra="forbid")
    n_samples: int | None = Field(
        None, ge=1, description="(t, ε, v) draws per example (None = the task's n_samples)."
    )


class DASOutput(EpsMeasurement):
    """``f = S^{-1/2} Σ_s v_sᵀ ε_θ(x_{t_s}, t_s)``, ``v_s`` Rademacher; a function, never a target.

    :meth:`residual` gives the matching ``e = S^{-1/2} Σ_s v_sᵀ (ε_s − ε_θ(x_{t_s}, t_s))`` on the
    same draws: ``(f, e)`` are one row of DAS's linearised least-squares problem.
    """

    name = "das-output"
    is_target = False

    def draw(self, batch: Batch, generator: torch.Generator) -> Batch:
        """``{"t", "eps"}`` as for the loss, plus ``"v"``: ±1 of ε's shape."""
        noise = super().draw(batch, generator)
        bits = torch.randint(0, 2, noise["eps"].shape, generator=generator)
        noise["v"] = (2 * bits - 1).to(noise["eps"].dtype)
        return noise

    def evaluate(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """``(B,)``: the sketched output ``f``."""
        _, _, pred = self.predict(forward, batch, noise)
        return (noise["v"] * pred).flatten(2).sum(dim=2).sum(dim=1) / math.sqrt(self.n_samples)

    def residual(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """``(B,)``: the sketched residual ``e`` (target minus output) on the same draws."""
        _, eps, pred = self.predict(forward, batch, noise)
        r = (noise["v"] * (eps - pred)).flatten(2).sum(dim=2)
        return r.sum(dim=1) / math.sqrt(self.n_samples)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_samples": self.n_samples, "T": self.schedule.T}


def das_output_factory(task: Task, n_samples: int | None = None) -> DASOutput:
    """``das-output`` for a diffusion task (ConfigError naming why on any other)."""
    schedule, default_n = diffusion_schedule(task, "das-output")
    return DASOutput(schedule, n_samples or default_n)


das_output_factory.is_target = False  # type: ignore[attr-defined]


# ---- the leave-one-out step ---------------------------------------------------------------------
def leave_one_out_steps(
    rows: Tensor, residuals: Tensor, damping: float
) -> tuple[Tensor, Tensor, float]:
    """Leverage-corrected leave-one-out steps of ridge least squares.

    For ``min_θ Σ_i (e_i − a_iᵀ θ)² + λ‖θ‖²`` at its solution, removing row ``i`` changes θ by
    ``−δ_i`` with ``δ_i = A⁻¹ a_i e_i / (1 − h_i)``, ``A = Σ_j a_j a_jᵀ + λI``,
    ``h_i = a_iᵀ A⁻¹ a_i`` (Sherman–Morrison; exact).

    Args:
        rows: ``(N, k)`` the rows ``a_i``.
        residuals: ``(N,)`` the residuals ``e_i``.
        damping: ``λ ≥ 0`` (absolute).

    Returns:
        ``(δ: (N, k), h: (N,), λ)`` in float64.

    Raises:
        NumericalError: ``A`` is not positive definite, or some ``h_i`` is 1 (the row is the
            only one spanning a direction: its removal is not a finite step).
    """
    a = rows.to(torch.float64)
    k = a.shape[1]
    system = a.T @ a + damping * torch.eye(k, dtype=a.dtype, device=a.device)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise NumericalError(
            f"das: Σ a_i a_iᵀ + λI (k = {k}, λ = {damping:.3g}) is not positive definite with "
            f"N = {a.shape[0]} rows; raise `damping` (or keep damping_mode: relative, c > 0)"
        )
    solved = torch.cholesky_solve(a.T, chol).T  # (N, k): A⁻¹ a_i
    leverage = (solved * a).sum(dim=1)
    gap = 1.0 - leverage
    if bool((gap <= 1e-12).any()):
        i = int(torch.argmin(gap))
        raise NumericalError(
            f"das: leverage h_{i} = {float(leverage[i]):.12g} ≥ 1 (example {i} alone spans a "
            f"direction of the features); raise `damping` so that every h_i < 1"
        )
    steps = solved * (residuals.to(torch.float64) / gap)[:, None]
    return steps, leverage, float(damping)


# ---- the scorer ---------------------------------------------------------------------------------
class DASOptions(BaseModel):
    """Options of the ``das`` scorer."""

    model_config = ConfigDict(extra="forbid")
    damping: float = Field(
        0.1, ge=0.0, description="λ (absolute) or c in λ = c·tr(Σ a_i a_iᵀ)/k (relative)."
    )
    damping_mode: Literal["relative", "absolute"] = Field(
        "relative", description="relative: λ = c · mean eigenvalue of Σ a_i a_iᵀ; absolute: λ."
    )
    query_draws: int = Field(
        16, ge=1, description="m: (t, ε, v) draws per query averaged in the squared distance."
    )


class DASScorer(Scorer):
    """``score[i, q] = (1/m) Σ_r (ψ_{q,r}ᵀ δ_i)²`` (module docstring); non-negative."""

    name = "das"
    accepts = frozenset({"compressor"})
    gradient_based = True

    def __init__(
        self,
        parts: MethodParts,
        damping: float = 0.1,
        damping_mode: str = "relative",
        query_draws: int = 16,
    ) -> None:
        self.parts = parts
        self.damping = float(damping)
        self.damping_mode = damping_mode
        self.query_draws = int(query_draws)

    def scores(
        self, task: Task, model: nn.Module, queries: Batch, context: ScoringContext
    ) -> Tensor:
        """``(n_train, n_query)`` DAS scores, written into ``context.sink``."""
        train_fn, query_fn = self._functions(context)
        params, excluded = select_parameters(model)
        layout = layout_of(params)
        n_params = sum(k for _, k in layout)
        compressor = self.parts.compressor or NoCompression()
        compressor.fit(n_params, self.parts.seed, layout=layout)
        context.info["parameters"] = {
            "included": len(layout),
            "n_params": n_params,
            "excluded": excluded,
        }
        context.info["compressor"] = compressor.describe()
        common = {"params": params, "seed": self.parts.seed, "chunk_size": context.chunk_size}
        data = task.train_data()

        t0 = time.perf_counter()
        cache = GradientCache(context.cache_dir) if context.cache_dir is not None else None
        train = GradientStream(model, train_fn, data, stream="train", cache=cache, **common)
        rows = train.compressed(compressor).stack(progress=context.progress, desc="das rows")
        self._check_dim(rows.shape[1])
        e = sketch_residuals(model, train_fn, data, self.parts.seed, context.chunk_size)
        context.timings["train_gradients"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        lam = self._lambda(rows)
        steps, leverage, _ = leave_one_out_steps(rows, e, lam)
        context.info["curvature"] = {
            "damping": lam,
            "damping_mode": self.damping_mode,
            "k": int(rows.shape[1]),
            "max_leverage": float(leverage.max()),
            "mean_leverage": float(leverage.mean()),
        }
        del rows
        context.timings["fit"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        n_query = batch_size(queries)
        repeated = repeat_rows(queries, self.query_draws)
        qstream = GradientStream(model, query_fn, repeated, stream="query", **common)
        psi = qstream.compressed(compressor).stack(desc="das query rows").to(torch.float64)
        context.timings["query_gradients"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        sink = context.sink(task.n_train, n_query, psi.dtype, psi.device)
        for start in range(0, steps.shape[0], context.chunk_size):
            block = steps[start : start + context.chunk_size]
            proj = (block @ psi.T).reshape(block.shape[0], self.query_draws, n_query)
            sink.write(slice(start, start + block.shape[0]), proj.pow(2).mean(dim=1))
        context.timings["scores"] = time.perf_counter() - t0
        return sink.result()

    def plan(self, sizes: PlanSizes) -> list[Phase]:
        """Training rows, the k×k solve, query rows, scores (sizes only; nothing runs)."""
        n, q, p, b = sizes.n_train, sizes.n_query, sizes.n_params, sizes.itemsize
        m = self.query_draws
        return [
            Phase("train_gradients", n, (n, p), n * p * b, "training rows a_i (compressed)"),
            Phase("fit", n, (n, p), n * p * 8, "Σ a_i a_iᵀ + λI, leverages, steps δ_i"),
            Phase("query_gradients", q * m, (q * m, p), q * m * p * b, f"{m} rows per query"),
            Phase("scores", n, (n, q), n * q * b, "squared projections averaged over draws"),
        ]

    # ---- helpers -------------------------------------------------------------------------------
    def _functions(self, context: ScoringContext) -> tuple[Any, Any]:
        train_fn = self.parts.train_function
        query_fn = self.parts.query_function or context.target
        if not callable(getattr(train_fn, "residual", None)):
            raise ConfigError(
                f"method {self.parts.label!r}.train_function: scorer 'das' needs a function "
                f"with a residual (target minus output), got {train_fn.name!r}; use "
                f"train_function: das-output"
            )
        return train_fn, query_fn

    def _lambda(self, rows: Tensor) -> float:
        if self.damping_mode == "absolute":
            return self.damping
        trace = float(rows.to(torch.float64).pow(2).sum())
        return self.damping * trace / rows.shape[1]

    @staticmethod
    def _check_dim(k: int) -> None:
        if k > MAX_K:
            raise ConfigError(
                f"das: feature dimension k = {k} > {MAX_K}: the k×k float64 system would need "
                f"{k * k * 8 / 2**20:.0f} MiB; use compressor: projection with proj_dim ≤ {MAX_K}"
            )


def sketch_residuals(
    model: nn.Module, measurement: Any, data: Batch, seed: int, chunk_size: int
) -> Tensor:
    """``(N,)`` residuals ``e_i`` on the same per-example draws as the training gradients."""
    out = []
    n = batch_size(data)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            chunk = index_batch(data, slice(start, min(start + chunk_size, n)))
            noise = example_noise(measurement, chunk, seed, "train", start)
            out.append(measurement.residual(model, chunk, noise))
    return torch.cat(out)


def repeat_rows(batch: Batch, m: int) -> Batch:
    """``m`` copies of every query, row ``r·Q + q`` (each copy gets its own draws)."""
    return {k: v.repeat(m, *([1] * (v.ndim - 1))) for k, v in batch.items()}
