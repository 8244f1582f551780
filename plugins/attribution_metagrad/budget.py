"""Memory model of one metagradient pass, and the refusal before work when it does not fit.

A reverse pass (:func:`attribution_metagrad.replay.weight_gradients`) holds, at its peak:

* ``states_held`` training states ``(θ, Adam moments, EMA)`` — the checkpoints plus one
  recomputed segment (:meth:`ReplayPlan.states_held`);
* one adjoint per query, each the size of a state (every query block's adjoint lives for the
  whole reverse walk);
* the linearisation of one training step (the residuals its VJP keeps: activations of the
  forward pass and of the step's own backward, since the step contains a gradient) and the
  ``query_batch``-wide temporaries of the vmapped pullback — modelled as ``(1 + Q_b)`` times
  the residuals;
* the ``(N, Q)`` weight gradients and the ``(N, Q)`` scores (float64 accounting);
* a fixed ``RUNTIME_OVERHEAD`` (what the parts do not model);
* before the reverse walk, instead of the step part: the query gradients of one sub-block
  (``QUERY_BACKWARD_FACTOR`` × the residuals of the measurement's forward on the sub-block's
  queries with all their draws), whichever is larger.

Residual sizes are measured, not guessed: one training step (step 1 of the replayed draw
stream, from the initial state) is run under plain autograd with ``create_graph`` — the same
graph ``torch.func.vjp`` keeps — inside :func:`torch.autograd.graph.saved_tensors_hooks`, and
the distinct storages it saves are summed; the query forward likewise. ``benchmarks/perf/metagradient.py`` compares the
estimate with the measured peak resident memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from attribution_core import (
    Batch,
    ConfigError,
    Measurement,
    Task,
    index_batch,
    initial_training_state,
)

GIB = 1024**3
RUNTIME_OVERHEAD = 512 * 2**20
"""Bytes added to every estimate for what the parts do not model (allocator caching of the
forward passes' activations, vmap temporaries, the runtime): with it the estimate was 1.25–2.1×
the measured peak resident memory on every row of ``benchmarks/perf/metagradient.py``."""
QUERY_BACKWARD_FACTOR = 4
"""Peak of a query sub-block's ``vmap(grad)`` over the residuals its forward saves: measured
3.5× on the digits U-Net (32 queries × 256 draws: 6.08 GB peak over 1.72 GB residuals; the
backward holds activation gradients next to the residuals); rounded up."""

PASS_RUNS = (5.0, 1.7, 1.7)
"""``(a, b, c)`` of the time model of one pass, in training runs of the same ``T``:
``a + Q · (b + c / query_batch)`` — the forward run with its checkpoints, each segment's
recomputation and linearisation (``a``), and per query its pullbacks (``b``, shared by a batch of
queries through ``vmap``) and its share of the batch's bookkeeping (``c``). Fitted to the CPU-time
rows of ``benchmarks/results/metagradient_perf.md`` (T = 100, width 16): 8.4 / 20.2 / 62.7 / 114
runs measured for (Q, query_batch) = (1, 1) / (8, 8) / (32, 32) / (32, 1); the model gives
8.4 / 20.3 / 61.1 / 114. Widths 8 and 32 measured 0.8× and 1.07× the width-16 row."""


def pass_runs(n_query: int, query_batch: int) -> float:
    """Training runs one pass over ``n_query`` queries costs (:data:`PASS_RUNS`)."""
    a, b, c = PASS_RUNS
    return a + n_query * (b + c / max(1, min(query_batch, n_query)))


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one metagradient pass, by part (see module docstring).

    Attributes:
        state_bytes: one training state ``(θ, s)``.
        states_held: states kept at the peak (checkpoints + one segment).
        n_query: ``Q`` (one adjoint each).
        step_bytes: residuals of one training step's linearisation (measured).
        query_batch: ``Q_b``.
        score_bytes: weight gradients and scores, ``2 · N · Q · 8``.
        query_bytes: peak of one query sub-block's gradients (``QUERY_BACKWARD_FACTOR`` × its
            measured forward residuals).
    """

    state_bytes: int
    states_held: int
    n_query: int
    step_bytes: int
    query_batch: int
    score_bytes: int
    query_bytes: int = 0

    @property
    def total(self) -> int:
        """Estimated peak bytes of the pass (on top of the process's baseline)."""
        states = self.state_bytes * (self.states_held + self.n_query)
        step = self.step_bytes * (1 + self.query_batch)
        return states + max(step, self.query_bytes) + self.score_bytes + RUNTIME_OVERHEAD

    def describe(self) -> dict[str, float]:
        """The parts in GiB, for the manifest and error messages."""
        return {
            "total_gib": self.total / GIB,
            "states_gib": self.state_bytes * self.states_held / GIB,
            "adjoints_gib": self.state_bytes * self.n_query / GIB,
            "step_gib": self.step_bytes * (1 + self.query_batch) / GIB,
            "query_gradients_gib": self.query_bytes / GIB,
            "scores_gib": self.score_bytes / GIB,
            "runtime_gib": RUNTIME_OVERHEAD / GIB,
        }


def available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else physical memory (``sysconf``)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _tree_bytes(*trees: dict[str, Tensor] | None) -> int:
    return sum(v.numel() * v.element_size() for t in trees if t for v in t.values())


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs (plain autograd)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def step_residual_bytes(task: Task, seed: int, weights: Tensor, start: tuple) -> int:
    """Residual bytes of one training step's differentiable graph (step 1 of ``seed``, from
    ``start = initial_training_state(task, seed)``)."""
    params, state = start
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    w = weights.detach().clone().requires_grad_()
    return saved_bytes(lambda: task.train_step(leaves, state, 1, task.draw_stream(seed, 1), w))


def query_residual_bytes(
    model: nn.Module, measurement: Measurement, queries: Batch, noise: Batch, rows: slice
) -> int:
    """Residual bytes of the measurement's forward on the queries (and draws) in ``rows``."""
    block = index_batch(queries, rows)
    nz = index_batch(noise, rows) if noise else {}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}

    def forward(*args: object, **kwargs: object) -> Tensor:
        return functional_call(model, leaves, args, kwargs)

    return saved_bytes(lambda: measurement.evaluate(forward, block, nz))


def estimate_memory(
    task: Task,
    seed: int,
    weights: Tensor,
    plan: tuple[int, int, int],
    query_bytes: int = 0,
) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of a pass (runs one probe training step).

    Args:
        plan: ``(states held, Q, Q_b)``.
        query_bytes: :func:`query_residual_bytes` of one query sub-block (0: not counted);
            multiplied by ``QUERY_BACKWARD_FACTOR`` here.
    """
    states_held, n_query, query_batch = plan
    start = initial_training_state(task, seed)
    params, state = start
    return MemoryEstimate(
        state_bytes=_tree_bytes(params, state.exp_avg, state.exp_avg_sq, state.ema),
        states_held=states_held,
        n_query=n_query,
        step_bytes=step_residual_bytes(task, seed, weights, start),
        query_batch=min(query_batch, n_query),
        score_bytes=2 * weights.shape[0] * n_query * 8,
        query_bytes=QUERY_BACKWARD_FACTOR * query_bytes,
    )


def require_fits(estimate: MemoryEstimate, limit_gib: float | None) -> float:
    """The limit in GiB; refuse before any work when the estimate exceeds it.

    Args:
        estimate: the pass's estimate.
        limit_gib: the method's ``memory_limit_gb``; None = the memory available now.

    Raises:
        ConfigError: the estimate exceeds the limit (states the estimate, its parts and what to
            change).
    """
    limit = available_bytes() / GIB if limit_gib is None else float(limit_gib)
    if estimate.total / GIB <= limit:
        return limit
    parts = ", ".join(f"{k.removesuffix('_gib')} {v:.3g}" for k, v in estimate.describe().items())
    source = "memory_limit_gb" if limit_gib is not None else "available memory (MemAvailable)"
    raise ConfigError(
        f"metagradient: estimated peak memory {estimate.total / GIB:.3g} GiB exceeds the "
        f"{source} {limit:.3g} GiB (GiB: {parts}); lower query_batch (one adjoint per query is "
        f"held, {estimate.state_bytes / 2**20:.3g} MiB each; the step residuals scale with "
        f"query_batch), choose checkpoint_every ≈ √T ({estimate.states_held} states held now), "
        f"score fewer queries per run, or raise memory_limit_gb"
    )
