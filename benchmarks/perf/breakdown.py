"""Where ekfac-influence and trak spend their time, component by component, vs the floor.

One process: warm-up on 64 examples, then each method once through the pipeline (fresh cache)
with timers wrapped around its inner kernels; the floor (``_common.floor_times``) is measured
before and after each method (mean used). Components:

* EK-FAC (hook back-end, ``attribution_kfac.factors``): the factor pass (input covariances ``A``,
  output-gradient covariances ``G``, the backward passes to the layer outputs, and the rest:
  forward passes and data), the eigenvalue-correction pass (the eigenbasis rotation of every
  row's gradient, the patch matrices it needs, the backward passes, the rest), the remainder of
  the fit (eigendecompositions), the query phase, and the training-gradient phase (per-example
  gradients and the scoring matmuls).
* TRAK: per-example gradients, generating Φ, the projection GEMMs, the rest (Fisher, solve).

The rotation's multiply-adds are counted from the shapes (the cost model ``_corrected`` uses to
pick a side) and set against a reference single-thread GEMM of a similar shape, so the table says
how close that part runs to the machine's GEMM rate.

    .venv/bin/python benchmarks/perf/breakdown.py [--classes 0 1] [--samples 8] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import attribution_kfac.factors as factors
import attribution_kfac.rotation as rotation
import torch
from _common import build, fixed_queries, floor_times, header, table, task_options
from attribution_trak.projection import ProjectionCompressor
from vs_floor import repeated_task, run_method


def rotation_macs(g: torch.Tensor, conv: bool, qa: torch.Tensor) -> int:
    """Multiply-adds of one ``rotation.corrected_squares`` call (the side it picks)."""
    gt = g if conv else g.transpose(1, 2)
    b, d, L = gt.shape
    D = qa.shape[0]
    if L == 1:
        return b * (d * d + D * D + d * D)
    return b * min(L * (d * d + D * D) + L * d * D, L * d * D + d * D * (d + D))


@contextlib.contextmanager
def kernel_timers() -> Iterator[dict[str, float]]:
    """Seconds per component (keys ``<pass>/<part>``) and the rotation's multiply-adds."""
    acc: dict[str, float] = defaultdict(float)
    state = {"pass": "other"}
    undo: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, new: Any) -> None:
        undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def timed(owner: Any, name: str, part: str, pass_name: str | None = None) -> None:
        orig = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            prev = state["pass"]
            if pass_name:
                state["pass"] = pass_name
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                key = f"{pass_name}/total" if pass_name else f"{state['pass']}/{part}"
                acc[key] += time.perf_counter() - t0
                state["pass"] = prev

        patch(owner, name, wrapper)

    timed(factors.FactorPasses, "kronecker_factors", "", "factor pass")
    timed(factors.FactorPasses, "eigenvalue_correction", "", "correction pass")
    timed(factors.FactorPasses, "_input_covariance", "A covariance")
    timed(factors.FactorPasses, "_gradient_covariance", "G covariance")
    timed(rotation, "patch_matrix_cl", "patch matrices")
    timed(ProjectionCompressor, "_full_matrix", "Φ generation")

    orig_rot = rotation.corrected_squares

    def rotated(g, conv, qg, a, qa, *memo):
        t0 = time.perf_counter()
        try:
            return orig_rot(g, conv, qg, a, qa, *memo)
        finally:
            acc[f"{state['pass']}/rotation"] += time.perf_counter() - t0
            acc["rotation MACs"] += rotation_macs(g, conv, qa)

    patch(rotation, "corrected_squares", rotated)
    orig_out = factors.FactorPasses._output_gradients

    def output_gradients(self, *args: Any, **kwargs: Any):
        it = orig_out(self, *args, **kwargs)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                acc[f"{state['pass']}/backward to outputs"] += time.perf_counter() - t0
            yield item

    patch(factors.FactorPasses, "_output_gradients", output_gradients)
    try:
        yield acc
    finally:
        for owner, name, orig in reversed(undo):
            setattr(owner, name, orig)


def gemm_rate(rows: int = 8192, d: int = 288, repeats: int = 5) -> float:
    """GFLOP/s of a single-thread ``(rows, d) @ (d, d)`` float32 GEMM (best of ``repeats``)."""
    x, q = torch.randn(rows, d), torch.randn(d, d)
    x @ q
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x @ q
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * d * d / best / 1e9


def component_rows(method: str, r: dict, acc: dict, floor: float, rate: float) -> list[dict]:
    """One row per component: seconds and ratio to the floor."""
    tm, grads = r["timings"], r["acc"].get("gradients", 0.0)
    rows: list[tuple[str, float]] = []
    if method.startswith("ekfac"):
        for p in ("factor pass", "correction pass"):
            total = acc.get(f"{p}/total", 0.0)
            parts = [
                (k.split("/", 1)[1], v)
                for k, v in acc.items()
                if k.startswith(p + "/") and not k.endswith("/total")
            ]
            rows += [(f"{p}: {name}", v) for name, v in sorted(parts, key=lambda kv: -kv[1])]
            rows.append((f"{p}: forward passes, data, rest", total - sum(v for _, v in parts)))
            rows.append((f"{p} (total)", total))
        passes = acc.get("factor pass/total", 0.0) + acc.get("correction pass/total", 0.0)
        rows.append(("fit: eigendecompositions, rest", tm["fit"] - passes))
        rows.append(("query phase", tm["query_gradients"]))
        rows.append(
            ("train phase (per-example gradients + scores)", tm["train_gradients_and_scores"])
        )
        rows.append(("  of which per-example gradients (all phases)", grads))
        macs = acc.get("rotation MACs", 0.0)
        rows.append(
            (f"(not in the total) the rotation at {rate:.0f} GFLOP/s", 2 * macs / rate / 1e9)
        )
    else:
        gen = acc.get("other/Φ generation", 0.0)
        proj = r["acc"].get("compress", 0.0)
        rows += [
            ("per-example gradients (fit + query)", grads),
            ("Φ generation", gen),
            ("projection GEMMs", proj - gen),
            ("rest (Fisher, solve, scores)", tm["total"] - grads - proj),
        ]
    rows.append(("total", tm["total"]))
    return [{"method": method, "component": c, "s": s, "× floor": s / floor} for c, s in rows]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["ekfac-influence", "trak"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 examples, S=2")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    extra: dict[str, Any] = {"train_steps": 300} if len(a.classes) > 2 else {}
    if a.quick:
        extra, a.samples = {"n_train": 64, "train_steps": 20}, 2
    opts = task_options(a.classes, n_samples=a.samples, **extra)
    task, model, path = build(opts)
    queries = fixed_queries(task, model, path, 16)
    small, _, _ = repeated_task(opts, 64)
    for m in a.methods:  # warm-up
        run_method(m, opts, path, queries, a.samples, task=small)
    rows: list[dict] = []
    for m in a.methods:
        rate = gemm_rate()  # next to the method: the machine's speed drifts when shared
        before = floor_times(model, task, a.samples)[0]
        with kernel_timers() as acc:
            r = run_method(m, opts, path, queries, a.samples)  # r["acc"]: gradients, compress
        after = floor_times(model, task, a.samples)[0]
        floor = (before + after) / 2
        rows += component_rows(m, r, acc, floor, rate)
        print(f"  {m}: total {r['timings']['total']:.1f} s, floor {floor:.2f} s", flush=True)
    print(
        header(
            f"component breakdown, digits-{len(a.classes)} N={task.n_train} S={a.samples}, "
            "16 queries"
        )
    )
    print()
    print(table(rows))
    summ = [f"{r['method']} {r['× floor']:.2f}× floor" for r in rows if r["component"] == "total"]
    print("\nSUMMARY breakdown: " + ", ".join(summ))
    return rows


if __name__ == "__main__":
    main()
