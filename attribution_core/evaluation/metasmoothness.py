"""Is a training recipe smooth in the training-data weights? (``attribution metasmoothness``)

Metagradients (``∂m(θ_T(w))/∂w_j``) are only meaningful when the trained model is a smooth
function of the per-example weights ``w`` at the scales one cares about. Two checks, both on
the *single-model* retraining (:func:`~attribution_core.single_model.train_single_model`: the
base model's seed, initialisation and whole draw stream; only the weights change):

* **Def. 2 score** (metasmoothness, Engstrom et al. 2025, arXiv 2503.13751). Draw one
  direction ``v ~ N(0, I_N)`` (seeded). Train with weights ``1``, ``1 + h·v`` and ``1 + 2h·v``;
  ``θ₀, θ_h, θ_2h`` are the final included parameters (Linear/Conv2d weights and biases, the
  EMA when the run keeps one), flattened. With ``d = |θ_2h − θ₀|``::

      score(h) = Σ_i (d_i / Σ_k d_k) · sign(θ_h − θ₀)_i · sign(θ_2h − θ_h)_i

  — the ``d``-weighted fraction of coordinates that keep moving the same way along the
  segment, minus those that turn back. A map that is smooth at scale ``h`` scores ≈ 1
  (``θ_2h − θ_h ≈ θ_h − θ₀``); a chaotic one ≈ 0. ``θ₀`` is shared across ``h``.
* **Finite-difference convergence** for a few ``(j, query)`` pairs: central differences
  ``(m(θ(1 + h e_j)) − m(θ(1 − h e_j))) / 2h`` for decreasing ``h``, where ``m`` is the run's
  target measurement on the query with its Monte-Carlo draws fixed by the run's **query**
  stream (``example_noise(m, queries, seed, "query", 0)``), next to the reverse-mode
  metagradient when the ``metagradient`` plugin is installed. A smooth recipe's estimates
  settle (``O(h²)``) to the metagradient; a non-smooth one's wander or flip sign.

Everything runs in the config's dtype (``dtype: float64`` recommended: float32 round-off alone
makes ``θ_h − θ₀`` noisy at ``h = 1e-3``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attribution_core.batches import Batch, batch_size
from attribution_core.build import build_measurement
from attribution_core.config import load_config
from attribution_core.errors import ConfigError
from attribution_core.interfaces import Measurement, Task
from attribution_core.locking import command_locks
from attribution_core.per_example import example_noise, select_parameters
from attribution_core.pipeline import build_task, load_queries, resolve
from attribution_core.provenance import versions
from attribution_core.single_model import require_training_steps, train_single_model
from attribution_core.storage import atomic_write_json

DEFAULT_H = (1e-1, 1e-2, 1e-3)
DEFAULT_FD_STEPS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
Log = Callable[[str], None]


def smoothness_score(theta0: Tensor, theta_h: Tensor, theta_2h: Tensor) -> float:
    """Def. 2 score of three flattened parameter vectors (see module docstring).

    Returns:
        A float in ``[-1, 1]``; NaN when ``θ_2h = θ₀`` exactly (no movement to weigh).
    """
    a, b, c = (t.detach().double().reshape(-1) for t in (theta0, theta_h, theta_2h))
    d = (c - a).abs()
    total = d.sum()
    if float(total) == 0.0:
        return float("nan")
    agree = torch.sign(b - a) * torch.sign(c - b)
    return float(((d / total) * agree).sum())


def included_vector(model: nn.Module) -> Tensor:
    """The included parameters (Linear/Conv2d weights and biases) flattened in module order."""
    included, _ = select_parameters(model)
    return torch.cat([p.detach().reshape(-1) for p in included.values()])


def direction(n: int, seed: int) -> Tensor:
    """``v ~ N(0, I_n)`` in float64 from a CPU generator seeded by ``seed``."""
    return torch.randn(n, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


def def2_scores(
    task: Task,
    seed: int,
    hs: Sequence[float],
    direction_seed: int,
    *,
    theta0: Tensor | None = None,
    log: Log | None = None,
) -> list[dict[str, Any]]:
    """The Def. 2 score at each ``h``: ``1 + 2·len(hs)`` single-model trainings (``θ₀`` once).

    Args:
        task: a task with the training-step hook.
        seed: the base model's seed.
        hs: step sizes ``h``.
        direction_seed: seed of ``v``.
        theta0: ``θ₀`` when already trained (:func:`included_vector` of the all-ones model).
        log: progress lines (e.g. ``print``).

    Returns:
        One row per ``h``: ``{h, score, rel_change}`` (``‖θ_2h − θ₀‖ / ‖θ₀‖``) plus timings.
    """
    n = task.n_train
    v = direction(n, direction_seed)
    ones = torch.ones(n, dtype=torch.float64)
    if theta0 is None:
        theta0 = included_vector(train_single_model(task, ones, seed))
    rows = []
    for h in hs:
        t0 = time.perf_counter()
        th = included_vector(train_single_model(task, ones + h * v, seed))
        t2h = included_vector(train_single_model(task, ones + 2 * h * v, seed))
        score = smoothness_score(theta0, th, t2h)
        rel = float((t2h - theta0).norm() / theta0.norm())
        rows.append({"h": h, "score": score, "rel_change": rel, "seconds": _since(t0)})
        if log:
            log(f"def2 h={h:g}: score {score:.4f} (‖θ_2h − θ₀‖/‖θ₀‖ {rel:.3g})")
    return rows


def pick_pairs(n_train: int, n_query: int, k: int, seed: int) -> list[tuple[int, int]]:
    """``k`` pairs ``(j, query)``: distinct training examples, queries cycled, both seeded."""
    gen = torch.Generator().manual_seed(int(seed))
    js = torch.randperm(n_train, generator=gen)[: min(k, n_train)].tolist()
    qs = torch.randperm(n_query, generator=gen).tolist()
    return [(int(j), int(qs[i % n_query])) for i, j in enumerate(js)]


def query_values(
    model: nn.Module, measurement: Measurement, queries: Batch, noise: Batch
) -> Tensor:
    """``(Q,)`` float64: the measurement on every query with its fixed noise."""
    with torch.no_grad():
        return measurement.evaluate(model, queries, noise).detach().double()


def finite_differences(
    task: Task,
    seed: int,
    pairs: Sequence[tuple[int, int]],
    steps: Sequence[float],
    measure: Callable[[nn.Module], Tensor],
    log: Log | None = None,
) -> list[dict[str, Any]]:
    """Central differences ``(m(1 + h e_j) − m(1 − h e_j)) / 2h`` per pair and ``h``.

    Each ``(j, h)`` costs two trainings; pairs sharing ``j`` share them (every query is
    measured from one training).
    """
    n = task.n_train
    ones = torch.ones(n, dtype=torch.float64)
    by_j: dict[int, dict[float, Tensor]] = {}
    for j in dict.fromkeys(j for j, _ in pairs):
        by_j[j] = {}
        for h in steps:
            e = torch.zeros(n, dtype=torch.float64)
            e[j] = h
            plus = measure(train_single_model(task, ones + e, seed))
            minus = measure(train_single_model(task, ones - e, seed))
            by_j[j][h] = (plus - minus) / (2 * h)
            if log:
                log(f"fd j={j} h={h:g}: " + ", ".join(f"{x:.6g}" for x in by_j[j][h].tolist()))
    return [
        {"j": j, "query": q, "fd": [{"h": h, "value": float(by_j[j][h][q])} for h in steps]}
        for j, q in pairs
    ]


def reverse_mode(
    task: Task,
    seed: int,
    model: nn.Module,
    measurement: Measurement,
    queries: Batch,
    noise: Batch,
    pairs: Sequence[tuple[int, int]],
) -> list[float] | None:
    """``∂m/∂w_j`` per pair by the ``metagradient`` plugin's replay (None if not installed)."""
    try:
        from attribution_metagrad.replay import ReplayPlan, default_every, weight_gradients
        from attribution_metagrad.scorer import query_gradient_fn
    except ImportError:
        return None
    qs = sorted({q for _, q in pairs})
    rows = torch.tensor(qs)
    sub = {k: v[rows.to(v.device)] for k, v in queries.items()}
    nz = {k: v[rows.to(v.device)] for k, v in noise.items()}
    steps = task.training_recipe().steps
    plan = ReplayPlan(steps, default_every(steps), max(1, len(qs)))
    weights = torch.ones(task.n_train, dtype=task.dtype, device=task.device)
    grads = weight_gradients(
        task, seed, weights, query_gradient_fn(model, measurement, sub, nz), len(qs), plan
    )
    return [float(grads[j, qs.index(q)]) for j, q in pairs]


@dataclass
class SmoothnessReport:
    """What ``attribution metasmoothness`` measured (``OUT/metasmoothness.json``)."""

    meta: dict[str, Any]
    def2: list[dict[str, Any]]
    pairs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {**self.meta, "def2": self.def2, "pairs": self.pairs}

    def markdown(self) -> str:
        """The Def. 2 scores and the finite-difference table as markdown."""
        lines = [
            f"Metasmoothness of task {self.meta['task']['name']!r} ({self.meta['dtype']}, model "
            f"seed {self.meta['model_seed']}, direction seed {self.meta['direction_seed']})",
            "",
            "| h | Def. 2 score | ‖θ_2h − θ₀‖ / ‖θ₀‖ |",
            "|---|---|---|",
            *(f"| {r['h']:g} | {r['score']:.4f} | {r['rel_change']:.3g} |" for r in self.def2),
        ]
        if self.pairs:
            steps = [row["h"] for row in self.pairs[0]["fd"]]
            head = " | ".join(f"h = {h:g}" for h in steps)
            lines += ["", f"| j | query | {head} | reverse mode |", "|---" * (len(steps) + 3) + "|"]
            for p in self.pairs:
                vals = " | ".join(f"{row['value']:.6g}" for row in p["fd"])
                rev = "—" if p.get("reverse") is None else f"{p['reverse']:.6g}"
                lines.append(f"| {p['j']} | {p['query']} | {vals} | {rev} |")
        return "\n".join(lines)


def metasmoothness(
    config: str | Path | dict[str, Any],
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    hs: Sequence[float] = DEFAULT_H,
    pairs: int = 2,
    fd_steps: Sequence[float] = DEFAULT_FD_STEPS,
    direction_seed: int | None = None,
    log: Log | None = None,
    task: Task | None = None,
) -> SmoothnessReport:
    """Measure the config's recipe (see module docstring); write ``OUT/metasmoothness.json``.

    Args:
        config: a run config (its task, dtype, model seed, queries, target and run seed).
        out: output directory (None: nothing written).
        overrides: ``--set``-style overrides.
        hs: Def. 2 step sizes.
        pairs: number of ``(j, query)`` pairs of the finite-difference table (0: none).
        fd_steps: finite-difference step sizes.
        direction_seed: seed of ``v`` (default: the run seed).
        log: progress lines.
        task: a :class:`Task` object used instead of ``config.task`` (as in ``attribute``).

    Raises:
        ConfigError: the task has no training-step hook (named), ``model.path`` is set, or a
            step size is not positive.
    """
    cfg = load_config(config, list(overrides))
    bad = [h for h in (*hs, *fd_steps) if not h > 0]
    if bad or not hs:
        raise ConfigError(f"metasmoothness: step sizes must be > 0 and --h non-empty, got {bad}")
    if pairs < 0:
        raise ConfigError(f"metasmoothness: --pairs {pairs} < 0; give 0 or more pairs")
    if cfg.model.path:
        raise ConfigError(
            "model.path: metasmoothness retrains the task's recipe from model.seed; weights "
            "loaded from a file are not that run — remove model.path"
        )
    resolved = resolve(cfg, task_given=task is not None)
    torch.set_num_threads(cfg.threads)
    task = task if task is not None else build_task(resolved)
    require_training_steps(task, "metasmoothness")
    with command_locks(out):
        report = _measure(resolved, task, hs, pairs, fd_steps, direction_seed, log)
        if out is not None:
            atomic_write_json(Path(out) / "metasmoothness.json", report.to_json())
    return report


def _measure(resolved, task, hs, n_pairs, fd_steps, direction_seed, log) -> SmoothnessReport:
    cfg = resolved.config
    seed, dseed = cfg.model.seed, cfg.seed if direction_seed is None else direction_seed
    t0 = time.perf_counter()
    ones = torch.ones(task.n_train, dtype=torch.float64)
    base = train_single_model(task, ones, seed)
    timings = {"train_one": _since(t0)}
    if log:
        log(f"θ₀ trained in {timings['train_one']:.1f} s")
    def2 = def2_scores(task, seed, hs, dseed, theta0=included_vector(base), log=log)
    measurement = build_measurement(resolved.registry, task, resolved.target, "target")
    queries = load_queries(task, base, cfg)
    noise = example_noise(measurement, queries, cfg.seed, "query", 0)
    chosen = pick_pairs(task.n_train, batch_size(queries), n_pairs, dseed)
    rows = finite_differences(
        task,
        seed,
        chosen,
        fd_steps,
        lambda m: query_values(m, measurement, queries, noise),
        log,
    )
    if chosen:
        t1 = time.perf_counter()
        rev = reverse_mode(task, seed, base, measurement, queries, noise, chosen)
        timings["reverse_mode"] = _since(t1)
        for row, value in zip(rows, rev or [None] * len(rows), strict=True):
            row["reverse"] = value
    timings["total"] = _since(t0)
    meta = {
        "task": task.describe(),
        "dtype": cfg.dtype,
        "model_seed": seed,
        "direction_seed": dseed,
        "query_noise_seed": cfg.seed,
        "queries": cfg.queries.model_dump(),
        "target": {"name": resolved.target.name, **resolved.target_options},
        "n_train": task.n_train,
        "n_included_parameters": int(included_vector(base).numel()),
        "recipe": _recipe(task),
        "threads": torch.get_num_threads(),
        "timings": timings,
        "versions": versions(resolved.registry),
    }
    return SmoothnessReport(meta, def2, rows)


def _recipe(task: Task) -> dict[str, Any]:
    r = task.training_recipe()
    o = r.optimizer
    return {
        "steps": r.steps,
        "batch_size": r.batch_size,
        "optimizer": o.kind,
        "lr": o.lr,
        "eps": o.eps,
        "warmup_steps": o.warmup_steps,
        "ema_decay": r.ema_decay,
    }


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)
