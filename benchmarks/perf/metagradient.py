"""Metagradient cost: seconds per query as a multiple of one training run, and peak memory.

Issue 18, acceptance 4. Each row runs in a fresh child process (so allocator high-water marks
do not leak between rows) on ``ddpm-digits`` with the single-model digits-2 recipe
(``benchmarks/digits2-single.yaml``: classes 0/1, width 16, channel_mult [1, 2], batch 64,
lr 2e-3, Adam eps 1e-2), float32, one thread, with ``train_steps`` = T shortened so a row takes
minutes (every figure is a ratio to a training run of the same T in the same process):

* ``train_s``: one single-model training run of T steps (``train_single_model``);
* ``pass_s``: the whole metagradient pass (:func:`weight_gradients`: forward checkpoints,
  query gradients, T reverse steps with their segment recomputation) for Q queries;
* ``per_query_x``: ``pass_s / Q / train_s`` — the issue's "seconds per query as a multiple of
  one training run" (target ≤ 3× amortised with ``query_batch`` = Q);
* ``peak_mib``: peak resident memory during the pass minus the resident memory before it
  (sampled every 20 ms), next to the scorer's estimate (:mod:`attribution_metagrad.budget`).

The query measurement is the suites' target, ``loss`` with ``--draws`` (t, ε) draws per query
(256 in the suites).

    .venv/bin/python benchmarks/perf/metagradient.py [--quick] [--out FILE.json]

With ``--out``, each finished row is written at once (atomically) and a rerun with the same
``--out`` skips the rows already there (each row records its own date in ``started``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import RSSSampler, header, table

from attribution_core import atomic_write_json

RECIPE = {
    "classes": [0, 1],
    "width": 16,
    "channel_mult": [1, 2],
    "batch_size": 64,
    "lr": 0.002,
    "adam_eps": 0.01,
    "T": 1000,
}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One row: train once, then one metagradient pass, in this process."""
    from attribution_diffusion import DDPMDigitsTask
    from attribution_metagrad.replay import ReplayPlan, weight_gradients
    from attribution_metagrad.scorer import query_gradient_fn

    from attribution_core import example_noise, train_single_model

    torch.set_num_threads(1)
    opts = {**RECIPE, "width": spec["width"], "train_steps": spec["steps"]}
    task = DDPMDigitsTask(dtype=torch.float32, **opts)
    ones = torch.ones(task.n_train, dtype=task.dtype)
    t0, c0 = time.perf_counter(), time.process_time()
    model = train_single_model(task, ones, 0).eval()
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    n_query, qb, every = spec["queries"], spec["query_batch"], spec["every"]
    queries = task.make_queries(model, n_query, 0)
    measurement = task.training_loss(n_samples=spec["draws"])
    noise = example_noise(measurement, queries, 0, "query", 0)
    grads = query_gradient_fn(model, measurement, queries, noise)
    spans: list[tuple[float, float]] = []

    def timed(params, rows):
        s = time.perf_counter()
        out = grads(params, rows)
        spans.append((s, time.perf_counter()))
        return out

    plan = ReplayPlan(spec["steps"], every, qb)
    with RSSSampler() as rss:
        time.sleep(0.05)
        base = rss.peak(0.0, time.perf_counter())
        t1, c1 = time.perf_counter(), time.process_time()
        weight_gradients(task, 0, ones, timed, n_query, plan)
        pass_s, pass_cpu = time.perf_counter() - t1, time.process_time() - c1
        t2 = time.perf_counter()
        peak = rss.peak(t1, t2)
        peak_query = max(rss.peak(a, b) for a, b in spans)
        peak_reverse = rss.peak(spans[-1][1], t2)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        **spec,
        "params": n_params,
        "train_s": train_s,
        "pass_s": pass_s,
        "query_grad_s": sum(b - a for a, b in spans),
        "per_query_x": pass_s / n_query / train_s,
        "per_query_x_cpu": pass_cpu / n_query / train_cpu,
        "peak_mib": peak - base,
        "peak_query_mib": peak_query - base,
        "peak_reverse_mib": peak_reverse - base,
        **estimates(spec),
    }


def estimates(spec: dict[str, Any]) -> dict[str, float]:
    """The scorer's memory estimate for a row, recomputed with the current model of it.

    Residual sizes depend only on shapes, so an untrained model and random queries of the
    queries' shape give the same probe as the row's own (seconds instead of a training run).
    """
    from attribution_diffusion import DDPMDigitsTask
    from attribution_metagrad.replay import ReplayPlan
    from attribution_metagrad.scorer import pass_estimate

    from attribution_core import example_noise

    torch.set_num_threads(1)
    task = DDPMDigitsTask(
        dtype=torch.float32, **{**RECIPE, "width": spec["width"], "train_steps": spec["steps"]}
    )
    n_query, qb = spec["queries"], spec["query_batch"]
    model = task.build_model(0).eval()
    queries = {"x": torch.randn(n_query, *task.train_data()["x"].shape[1:])}
    measurement = task.training_loss(n_samples=spec["draws"])
    noise = example_noise(measurement, queries, 0, "query", 0)
    plan = ReplayPlan(spec["steps"], spec["every"], qb)
    parts = pass_estimate(task, 0, model, measurement, queries, noise, plan).describe()
    reverse = parts["states_gib"] + parts["adjoints_gib"] + parts["step_gib"]
    return {
        "estimate_mib": parts["total_gib"] * 1024,
        "estimate_query_mib": parts["query_gradients_gib"] * 1024,
        "estimate_reverse_mib": (reverse + parts["runtime_gib"]) * 1024,
    }


def rows(quick: bool) -> list[dict[str, Any]]:
    """The measured grid: cost vs query_batch (Q = 32), then memory vs k and growth with T and
    width at Q = 8 (against the ``Q=8`` row)."""
    q, d = (4, 16) if quick else (32, 256)
    t = 20 if quick else 100
    base = {"width": 16, "steps": t, "queries": q, "query_batch": q, "every": 10, "draws": d}
    small = {**base, "queries": q // 4, "query_batch": q // 4}
    grid = [
        {**base, "study": "batched"},
        {**base, "study": "query_batch=1", "query_batch": 1},
        {**base, "study": "one query", "queries": 1, "query_batch": 1},
        {**small, "study": f"Q={q // 4}"},
    ]
    grid += [{**small, "study": f"memory k={k}", "every": k} for k in (1, t)]
    grid += [{**small, "study": f"T={n}", "steps": n} for n in (t // 2, 2 * t)]
    grid += [{**small, "study": f"width={w}", "width": w} for w in (8, 32)]
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny grid (a smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    ap.add_argument(
        "--estimates-only",
        type=Path,
        default=None,
        help="recompute the estimate columns of a written JSON (after a change to the model)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.estimates_only:
        done = json.loads(args.estimates_only.read_text())
        done = [{**row, **estimates(row)} for row in done]
        args.estimates_only.write_text(json.dumps(done, indent=1))
        report(done)
        return
    print(header("metagradient cost and memory (ddpm-digits, digits-2 single-model recipe)"))
    done = json.loads(args.out.read_text()) if args.out and args.out.is_file() else []
    finished = {row["study"] for row in done}  # resume: rows already in --out are kept
    for spec in rows(args.quick):
        if spec["study"] in finished:
            continue
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            sys.exit(f"row {spec} failed:\n{proc.stderr[-3000:]}")
        done.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "started": started})
        print(json.dumps(done[-1]), flush=True)
        if args.out:
            atomic_write_json(args.out, done)
    report(done)


def report(done: list[dict[str, Any]]) -> None:
    """The two markdown tables: cost, then memory by phase."""
    cols = ["study", "width", "params", "steps", "queries", "query_batch", "every", "train_s"]
    cols += ["pass_s", "query_grad_s", "per_query_x", "per_query_x_cpu", "peak_mib"]
    print(table(done, [*cols, "estimate_mib"]))
    mem = ["study", "every", "queries", "query_batch", "peak_query_mib", "estimate_query_mib"]
    print(table(done, [*mem, "peak_reverse_mib", "estimate_reverse_mib"]))


if __name__ == "__main__":
    main()
