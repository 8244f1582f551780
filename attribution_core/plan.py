"""Plans before work: what a command would run, its peak memory and its time, without running it.

``--dry-run`` (``attribute``, ``bench``, ``suite build``) prints a :class:`RunPlan` and exits 0.
Sizes come from the task's data (``N``), the model *built untrained* (``p``, the included
parameters) and the config (``Q``); nothing is trained. Per method the phases are
``Method.plan(PlanSizes)``; each phase's peak memory is estimated as

    the process's resident memory now (interpreter, torch, data, model)
    + the phase's largest arrays (``Phase.bytes``)
    + per-example activations × the rows alive at once (gradient phases; measured)

and its time as ``Phase.rows`` × the seconds of one row of the phase's ``cost`` kind, measured on
the model the command would start from (untrained, or the loaded base model): a per-example
forward+backward and a batched one on a few training examples, and one optimiser step of the
task's training-step hook (two steps timed after a warm-up step; tasks without the hook leave
``"training-step"`` phases untimed). A run whose estimate exceeds the memory this
process may use (``MemAvailable`` plus its own resident memory, or ``ATTRIBUTION_MAX_MEMORY_MB``
when set) is refused before any work with the estimate and the option that lowers it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attribution_core.build import build_method
from attribution_core.errors import ConfigError
from attribution_core.interfaces import Task, index_batch
from attribution_core.per_example import example_noise, per_example_gradients, select_parameters
from attribution_core.records import Phase, PlanSizes
from attribution_core.single_model import recipe_if_replayable, training_state_of, unroll_training

MiB = 2**20
LOWERED_BY = {
    "fit": "the hessian's options (dense: use kfac/ekfac; projected-fisher: proj_dim)",
    "query_gradients": "queries.count (fewer queries per run) or the compressor's "
    "proj_dim/max_memory_mb",
    "train_gradients_and_scores": "chunk_size (rows of training gradients alive at once), "
    "queries.count, or the compressor's proj_dim/max_memory_mb",
    "ensemble_training": "ensemble.models",
    "scores": "queries.count",
    "retraining": "evaluation.lds.batch (models trained at once)",
}


def _status_kib(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def resident_bytes() -> int:
    """This process's resident memory now (``VmRSS``)."""
    return _status_kib("VmRSS") * 1024


def memory_budget() -> tuple[int, str]:
    """Bytes this process may grow to, and where the number comes from."""
    if env := os.environ.get("ATTRIBUTION_MAX_MEMORY_MB"):
        try:
            return int(float(env) * MiB), "ATTRIBUTION_MAX_MEMORY_MB"
        except ValueError:
            raise ConfigError(
                f"ATTRIBUTION_MAX_MEMORY_MB={env!r}: expected a number of MiB, e.g. 4096"
            ) from None
    avail = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return 2**62, "unknown (no /proc/meminfo)"
    return resident_bytes() + avail, "available memory"


@dataclass(frozen=True)
class Probe:
    """A short measurement on the untrained model: seconds per example of a per-example
    forward+backward (vmapped, as gradient phases run it) and of a batched one (as K-FAC-style
    fits run it), and the peak resident memory a per-example row adds."""

    seconds_per_row: float
    seconds_per_batched_row: float
    bytes_per_row: int
    rows: int
    seconds_per_step: float | None = None

    def seconds(self, phase: Phase) -> float | None:
        """Estimated seconds of ``phase`` (None: a training-step phase without a timed step)."""
        if phase.cost == "training-step":
            return None if self.seconds_per_step is None else phase.rows * self.seconds_per_step
        rate = self.seconds_per_batched_row if phase.cost == "batched" else self.seconds_per_row
        return phase.rows * rate


def probe(task: Task, model: nn.Module, measurement: Any, seed: int, rows: int = 16) -> Probe:
    """Time per-example gradients of ``rows`` training examples (after a warm-up call), the
    peak resident memory they add, and one batched forward+backward of the same rows."""
    params, _ = select_parameters(model)
    rows = max(1, min(rows, task.n_train))
    batch = index_batch(task.train_data(), slice(0, rows))
    noise = example_noise(measurement, batch, seed, "train", 0)
    model.eval()
    warm = slice(0, max(1, rows // 4))
    per_example_gradients(
        model, measurement, index_batch(batch, warm), index_batch(noise, warm), params
    )
    try:  # reset the peak-RSS mark (Linux >= 4.0), so VmHWM measures this call alone
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = resident_bytes()
    t0 = time.perf_counter()
    G = per_example_gradients(model, measurement, batch, noise, params)
    per_row = (time.perf_counter() - t0) / rows
    grown = max(0, _status_kib("VmHWM") * 1024 - before - G.numel() * G.element_size())
    del G
    t0 = time.perf_counter()
    measurement.evaluate(model, batch, noise).sum().backward()
    batched = (time.perf_counter() - t0) / rows
    model.zero_grad(set_to_none=True)
    return Probe(per_row, batched, grown // rows, rows, step_seconds(task, model, seed))


def step_seconds(task: Task, model: nn.Module, seed: int) -> float | None:
    """Seconds of one optimiser step of ``task.train_step`` from ``model``'s parameters (steps
    2 and 3 of the draw stream of ``seed``, after step 1 as a warm-up), or None without the hook.
    """
    recipe = recipe_if_replayable(task)
    if recipe is None:
        return None
    params, state = training_state_of(model, recipe)
    weights = torch.ones(task.n_train, dtype=task.dtype, device=task.device)
    timed = range(2, min(recipe.steps, 3) + 1) or range(1, 2)
    with torch.no_grad():
        if timed.start > 1:
            params, state = unroll_training(task, params, state, weights, seed, range(1, 2))
        t0 = time.perf_counter()
        unroll_training(task, params, state, weights, seed, timed)
    return (time.perf_counter() - t0) / len(timed)


@dataclass(frozen=True)
class PhaseEstimate:
    """A method's phase with its estimated peak memory and time."""

    label: str
    phase: Phase
    peak_bytes: int
    seconds: float | None
    lowered_by: str


@dataclass
class RunPlan:
    """The resolved plan of one command (printed by ``--dry-run``)."""

    command: str
    sizes: PlanSizes
    methods: dict[str, dict[str, Any]]
    phases: list[PhaseEstimate]
    baseline_bytes: int
    budget: tuple[int, str]
    probe: Probe | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        """The largest phase peak (the baseline if there is no phase)."""
        return max([self.baseline_bytes, *(p.peak_bytes for p in self.phases)])

    @property
    def seconds(self) -> float | None:
        """Estimated total time of the phases (None without a probe)."""
        if self.probe is None:
            return None
        return sum(p.seconds or 0.0 for p in self.phases)

    def check(self) -> None:
        """Refuse (before work) a plan whose peak memory exceeds the budget.

        Raises:
            ConfigError: names the phase, the estimate, the budget and the option that lowers it.
        """
        budget, source = self.budget
        worst = max(self.phases, key=lambda p: p.peak_bytes, default=None)
        if worst is None or worst.peak_bytes <= budget:
            return
        raise ConfigError(
            f"memory: {self.command} would need about {worst.peak_bytes / MiB:,.0f} MiB in phase "
            f"{worst.phase.name!r} of method {worst.label!r} (largest array "
            f"{tuple(worst.phase.largest)}, {worst.phase.bytes / MiB:,.0f} MiB), more than the "
            f"{budget / MiB:,.0f} MiB of {source}; lower it with {worst.lowered_by}"
        )

    def format(self) -> str:
        """The plan as text."""
        s = self.sizes
        lines = [
            f"plan: {self.command} (dry run: nothing trained, nothing written)",
            f"sizes: n_train={s.n_train} n_query={s.n_query} n_params={s.n_params} "
            f"chunk_size={s.chunk_size} itemsize={s.itemsize}",
            f"baseline resident memory: {self.baseline_bytes / MiB:,.0f} MiB; budget "
            f"{self.budget[0] / MiB:,.0f} MiB ({self.budget[1]})",
        ]
        if self.probe is not None:
            lines.append(
                f"measured on {self.probe.rows} examples of the untrained model: "
                f"{self.probe.seconds_per_row * 1e3:.2f} ms and "
                f"{self.probe.bytes_per_row / MiB:.1f} MiB per per-example forward+backward, "
                f"{self.probe.seconds_per_batched_row * 1e3:.2f} ms per example batched"
                + (
                    ""
                    if self.probe.seconds_per_step is None
                    else f", {self.probe.seconds_per_step * 1e3:.1f} ms per training step"
                )
            )
        for label, desc in self.methods.items():
            lines.append(f"method {label}: {desc}")
            for p in (p for p in self.phases if p.label == label):
                t = "" if p.seconds is None else f", ~{p.seconds:,.1f} s"
                lines.append(
                    f"  {p.phase.name}: rows={p.phase.rows} largest={tuple(p.phase.largest)} "
                    f"peak ~{p.peak_bytes / MiB:,.0f} MiB{t}  [{p.phase.note}]"
                )
        lines += self.notes
        total = self.seconds
        lines.append(
            f"estimated peak memory: {self.peak_bytes / MiB:,.0f} MiB"
            + ("" if total is None else f"; estimated time: {total:,.1f} s")
        )
        return "\n".join(lines)


def model_sizes(task: Task, model: nn.Module, n_query: int, chunk_size: int) -> PlanSizes:
    """:class:`PlanSizes` of ``task`` with the included parameters of ``model``."""
    params, _ = select_parameters(model)
    return PlanSizes(
        n_train=task.n_train,
        n_query=n_query,
        n_params=sum(p.numel() for p in params.values()),
        chunk_size=chunk_size,
        itemsize=torch.empty((), dtype=task.dtype).element_size(),
        train_steps=recipe.steps if (recipe := recipe_if_replayable(task)) else 0,
    )


def estimate(
    phase: Phase, label: str, baseline: int, pr: Probe | None, chunk: int
) -> PhaseEstimate:
    """Peak memory and time of one phase (see the module docstring)."""
    alive = min(chunk, phase.rows) if phase.rows else 0
    act = pr.bytes_per_row * alive if pr is not None else 0
    seconds = None if pr is None else pr.seconds(phase)
    hint = LOWERED_BY.get(phase.name, "the method's options or chunk_size")
    return PhaseEstimate(label, phase, baseline + phase.bytes + phase.held + act, seconds, hint)


def plan_methods(
    resolved: Any,
    task: Task,
    sizes: PlanSizes,
    *,
    baseline: int,
    pr: Probe | None,
    skip: set[str] = frozenset(),  # type: ignore[assignment]
) -> tuple[dict[str, dict[str, Any]], list[PhaseEstimate]]:
    """Build each method (cheap: nothing fitted) and estimate its phases for ``sizes``."""
    methods, phases = {}, []
    for i, spec in enumerate(resolved.methods):
        methods[spec.label] = spec.describe()
        if spec.label in skip:
            continue
        method = build_method(spec, resolved.registry, task, where=f"methods[{i}]")
        for ph in method.plan(sizes):
            phases.append(estimate(ph, spec.label, baseline, pr, sizes.chunk_size))
    return methods, phases


def measured_probe(resolved: Any, task: Task, model: nn.Module) -> Probe:
    """:func:`probe` with the task's training loss (what the training-gradient phases run)."""
    return probe(task, model, task.training_loss(), resolved.config.seed)


def check_memory(resolved: Any, task: Task, n_query: int) -> None:
    """Refuse a run whose estimated peak memory exceeds the budget (sizes only, no probe).

    Raises:
        ConfigError: see :meth:`RunPlan.check`.
    """
    model = task.build_model(resolved.config.model.seed)
    sizes = model_sizes(task, model, n_query, resolved.config.chunk_size)
    del model
    baseline = resident_bytes()
    methods, phases = plan_methods(resolved, task, sizes, baseline=baseline, pr=None)
    RunPlan("this run", sizes, methods, phases, baseline, memory_budget()).check()
