"""bf16 vs float32: score agreement and time on digits-2 DDPM (``RunConfig.precision``).

For each method, ``attribution_core.pipeline.attribute`` runs once with ``precision: float32``
and once with ``precision: bf16`` (alternating, each with a fresh cache directory; same model,
16 fixed generated queries, same seeded (t, ε) draws). Reported: per-query Spearman and cosine
of the bf16 scores against the float32 ones (mean and worst query), the pipeline's phase times
and the process CPU time of both, and — what bf16 actually changes — a micro-benchmark of
``per_example_gradients`` on one 64-example chunk (best of 3, float32 vs bf16 autocast).

``tf32`` is not measured: it only acts on CUDA (on a CPU it is a no-op, and scores are
bit-identical — ``tests/core/test_precision.py``). The GPU path (``device: cuda`` with tf32 /
bf16) needs a lent GPU; where none is lent this script runs on the CPU and says so.

    .venv/bin/python benchmarks/perf/precision.py [--samples 8] [--methods grad-dot ...]
        [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import build, fixed_queries, header, table, task_options
from scipy.stats import spearmanr

from attribution_core.gradients import (
    example_noise,
    per_example_gradients,
    select_parameters,
)
from attribution_core.pipeline import attribute
from attribution_core.precision import run_precision

METHODS = ("grad-dot", "kfac-influence", "kfac-influence@1e-4", "kfac-influence@1e-2", "trak")


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per-query Spearman and cosine of two ``(n_train, n_query)`` score matrices."""
    rho = np.array([spearmanr(a[:, q], b[:, q])[0] for q in range(a.shape[1])])
    cos = np.einsum("nq,nq->q", a, b) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))
    return {
        "Spearman mean": float(rho.mean()),
        "Spearman min": float(rho.min()),
        "cosine mean": float(cos.mean()),
        "cosine min": float(cos.min()),
    }


def run(
    entry: dict[str, Any], precision: str, opts: dict, path: Path, queries: Path, s: int, dev: str
):
    """One pipeline run: ``(scores, timings, cpu seconds, precision record)``."""
    try:  # trak: regenerate Φ in each run (both precisions pay for it)
        from attribution_trak.projection import _SHARED_PHI

        _SHARED_PHI.clear()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="perf-precision-") as cache:
        cfg = {
            "task": opts,
            "model": {"path": str(path)},
            "queries": {"source": "file", "path": str(queries)},
            "target": {"name": "loss", "n_samples": s},
            "methods": [entry],
            "threads": torch.get_num_threads(),
            "cache_dir": cache,
            "device": dev,
            "precision": precision,
        }
        c0 = time.process_time()
        res = attribute(cfg)
        cpu = time.process_time() - c0
    man = next(iter(res.manifests.values()))
    return res.scores[man["label"]], man["timings"], cpu, man["precision"]


def gradient_micro(task: Any, model: torch.nn.Module, s: int, dev: str) -> list[dict[str, Any]]:
    """``per_example_gradients`` on 64 examples × S draws: float32 vs bf16, best of 3."""
    params, _ = select_parameters(model)
    meas = task.training_loss(s)
    batch = {k: v[:64] for k, v in task.train_data().items()}
    noise = example_noise(meas, batch, 0, "train", 0)
    out, grads = [], {}
    for precision in ("float32", "bf16"):
        best, best_cpu = float("inf"), float("inf")
        with run_precision(precision, dev):
            for _ in range(3):
                t0, c0 = time.perf_counter(), time.process_time()
                G = per_example_gradients(model, meas, batch, noise, params)
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
        grads[precision] = G
        out.append({"precision": precision, "s": best, "CPU s": best_cpu})
    rel = float((grads["bf16"] - grads["float32"]).norm() / grads["float32"].norm())
    cos = torch.nn.functional.cosine_similarity(grads["bf16"], grads["float32"], dim=1)
    for r in out:
        r["speed-up vs float32"] = out[0]["s"] / r["s"]
        r["rel. error of G"] = 0.0 if r["precision"] == "float32" else rel
        r["min per-example cosine"] = 1.0 if r["precision"] == "float32" else float(cos.min())
    return out


COLUMNS = [
    "method",
    "Spearman mean",
    "Spearman min",
    "cosine mean",
    "cosine min",
    "fp32 total s",
    "bf16 total s",
    "speed-up",
    "fp32 CPU s",
    "bf16 CPU s",
    "CPU speed-up",
    "fp32 fit/query/train s",
    "bf16 fit/query/train s",
]


def method_entry(name: str, samples: int) -> dict[str, Any]:
    """``"kfac-influence@1e-4"`` -> the method with ``damping: 1e-4`` (absolute) and its label."""
    base, _, damping = name.partition("@")
    entry: dict[str, Any] = {"name": base, "label": name.replace("@", "-")}
    if damping:
        entry["damping"] = float(damping)
    if "kfac" in base:
        entry["n_samples"] = samples  # S draws in the K-FAC fit too (preset default 1)
    return entry


def phases(tm: dict[str, float]) -> str:
    return f"{tm['fit']:.1f} / {tm['query_gradients']:.1f} / {tm['train_gradients_and_scores']:.1f}"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8, help="(t, ε) draws S everywhere")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help="method names; NAME@λ sets an absolute damping (kfac-influence default: 1e-8)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 examples, S=2")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    extra: dict[str, Any] = {}
    if a.quick:
        extra, a.samples = {"n_train": 64, "train_steps": 20}, 2
    opts = task_options([0, 1], n_samples=a.samples, **extra)
    task, model, path = build(opts)
    queries = fixed_queries(task, model, path, 16)
    micro = gradient_micro(task, model, a.samples, a.device)
    rows = []
    for name in a.methods:
        entry = method_entry(name, a.samples)
        got = {
            p: run(entry, p, opts, path, queries, a.samples, a.device) for p in ("float32", "bf16")
        }
        (s32, t32, c32, _), (s16, t16, c16, rec) = got["float32"], got["bf16"]
        assert rec["applied"], rec
        rows.append(
            {
                "method": name if "@" not in name else name.replace("@", " λ="),
                **agreement(s32, s16),
                "fp32 total s": t32["total"],
                "bf16 total s": t16["total"],
                "speed-up": t32["total"] / t16["total"],
                "fp32 CPU s": c32,
                "bf16 CPU s": c16,
                "CPU speed-up": c32 / c16,
                "fp32 fit/query/train s": phases(t32),
                "bf16 fit/query/train s": phases(t16),
            }
        )
    gpu = (
        f"device {a.device}"
        if a.device != "cpu"
        else "device cpu — no GPU lent to this task: the GPU path (tf32/bf16 on CUDA) was not measured"
    )
    print(
        header(
            f"bf16 vs float32: digits-2 DDPM, N={task.n_train}, S={a.samples}, 16 queries, {gpu}"
        )
    )
    print()
    print("per-example gradients, one chunk of 64 examples × S draws (best of 3):")
    print()
    print(table(micro))
    print()
    print(table(rows, COLUMNS))
    print()
    summ = ", ".join(
        f"{r['method']} Spearman {r['Spearman mean']:.3f} (min {r['Spearman min']:.3f}), "
        f"cosine min {r['cosine min']:.4f}, {r['speed-up']:.2f}× (CPU {r['CPU speed-up']:.2f}×)"
        for r in rows
    )
    print(
        f"SUMMARY precision ({a.device}): bf16 per-example gradients "
        f"{micro[1]['speed-up vs float32']:.2f}× float32 (rel. error {micro[1]['rel. error of G']:.3g}); "
        f"{summ}"
    )
    return rows


if __name__ == "__main__":
    main()
