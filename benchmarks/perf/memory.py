"""Peak RSS per phase when scoring N training examples × Q queries: bounded by a chunk, not N.

Runs the real pipeline (``attribution_core.pipeline.attribute``) on ``ddpm-digits`` with the
digits-10 images cycled to N training examples (the shipped task is unchanged: the benchmark
replaces the task object's image tensor, as ``vs_floor.py --scaling`` does) and the first Q
training images as queries (``queries: {source: train}`` — what the queries are does not change
what is held in memory). Each N runs in a fresh child process, so an allocator high-water mark
of one run cannot leak into the next; in the child a background thread samples the resident set
size and CPU time every 20 ms, and the pipeline's phase timings (fit, query gradients, training
gradients + scores) cut the samples into phases. Also counted: how many training-gradient
chunks (tensors returned by ``per_example_gradients``) are alive at once during scoring.

Printed next to the measured peaks: what holding every training gradient would cost
(N × p × 4 bytes, p = attributed parameters), one chunk (chunk_size × p × 4 bytes) and the query
gradients, which are held by design (Q × p × 4 bytes: the influence scorer multiplies every
training chunk by all of them) and the output, the ``(N, Q)`` float32 score matrix (the only
thing that must grow with N). With a ``cache_dir`` (the default here) the training gradients
are also written to the gradient cache, streamed chunk by chunk (page cache, not RSS).

    .venv/bin/python benchmarks/perf/memory.py [--sizes 1000 3000 10000] [--queries 1000]
        [--samples 1] [--method kfac-influence] [--chunk-size 64] [--no-cache] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Any

import torch
from _common import RSSSampler, build, header, table, task_options

MIB = 2**20


class Sampler(RSSSampler):
    """:class:`RSSSampler` that also records this process's CPU seconds (user + system)."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(interval)
        self.cpu: list[tuple[float, float]] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter()
            self.samples.append((now, self._proc.memory_info().rss))
            c = self._proc.cpu_times()
            self.cpu.append((now, c.user + c.system))
            self._stop.wait(self.interval)

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds between the samples nearest to ``t0`` and ``t1``."""
        if not self.cpu:
            return float("nan")
        first = min(self.cpu, key=lambda s: abs(s[0] - t0))[1]
        last = min(self.cpu, key=lambda s: abs(s[0] - t1))[1]
        return last - first


def cycled_task(opts: dict[str, Any], n: int):
    """The ``ddpm-digits`` task with its training images repeated (cycled) to ``n`` rows."""
    task, model, path = build(opts)
    x = task._x
    reps = -(-n // x.shape[0])
    task._x = x.repeat(reps, 1, 1, 1)[:n].contiguous()
    return task, model, path


def count_live_chunks():
    """Patch ``per_example_gradients`` to log ``(time, gradient tensors alive)`` per call."""
    import attribution_core.per_example as grads_mod

    orig = grads_mod.per_example_gradients
    state = {"alive": 0}
    events: list[tuple[float, int]] = []

    def released() -> None:
        state["alive"] -= 1

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        G = orig(*args, **kwargs)
        state["alive"] += 1
        weakref.finalize(G, released)
        events.append((time.perf_counter(), state["alive"]))
        return G

    grads_mod.per_example_gradients = counted
    return events


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured run (in its own process): returns the numbers as a JSON-able dict."""
    from attribution_core.gradients import select_parameters
    from attribution_core.pipeline import attribute

    torch.set_num_threads(spec["threads"])
    s = spec["samples"]
    opts = task_options(list(range(10)), train_steps=spec["train_steps"], n_samples=s)
    task, model, path = cycled_task(opts, spec["n"])
    p = sum(v.numel() for v in select_parameters(model)[0].values())
    events = count_live_chunks()
    entry: dict[str, Any] = {"name": spec["method"]}
    if "kfac" in spec["method"]:
        entry["n_samples"] = s  # draws of the K-FAC fit (preset default 1)
    with tempfile.TemporaryDirectory(prefix="perf-memory-") as cache:
        cfg = {
            "task": opts,
            "model": {"path": str(path)},
            "queries": {"source": "train", "count": spec["queries"]},
            "target": {"name": "loss", "n_samples": s},
            "methods": [entry],
            "threads": spec["threads"],
            "chunk_size": spec["chunk_size"],
            "cache_dir": cache if spec["cache"] else None,
        }
        with Sampler() as rss:
            time.sleep(0.1)
            t_start, c_start = time.perf_counter(), time.process_time()
            base = rss.peak(t_start - 0.1, t_start)
            res = attribute(cfg, task=task)
            t_end, cpu = time.perf_counter(), time.process_time() - c_start
            time.sleep(0.05)
    man = next(iter(res.manifests.values()))
    tm = man["timings"]
    t1 = t_end - tm["train_gradients_and_scores"]
    t0 = t1 - tm["query_gradients"]
    tf = t0 - tm["fit"]
    phases = {"fit": (tf, t0), "query": (t0, t1), "train": (t1, t_end)}
    live_train = [a for t, a in events if t1 <= t <= t_end]
    return {
        "n": task.n_train,
        "p": p,
        "baseline": base,
        "rss": {k: rss.peak(a, b) for k, (a, b) in phases.items()},
        "cpu": {k: rss.cpu_between(a, b) for k, (a, b) in phases.items()},
        "wall": {
            "fit": tm["fit"],
            "query": tm["query_gradients"],
            "train": tm["train_gradients_and_scores"],
        },
        "cpu_total": cpu,
        "wall_total": t_end - t_start,
        "max_live_chunks": max(live_train) if live_train else 0,
        "train_chunks": len(live_train),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "scores_shape": list(res.scores[man["label"]].shape),
    }


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter; its last stdout line is the JSON result."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child run failed ({spec}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


COLUMNS = [
    "method",
    "N",
    "queries",
    "chunk",
    "all train grads GiB",
    "one chunk MiB",
    "query grads MiB",
    "scores N×Q MiB",
    "baseline MiB",
    "peak fit MiB",
    "peak query MiB",
    "peak train+scores MiB",
    "train+scores − baseline MiB",
    "max live chunks",
    "ru_maxrss MiB",
    "wall fit/query/train s",
    "CPU fit/query/train s",
    "CPU total s",
]


def row(spec: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    """One table row from a child's result."""
    n, p, q, c = r["n"], r["p"], spec["queries"], spec["chunk_size"]
    w, cp = r["wall"], r["cpu"]
    return {
        "method": spec["method"],
        "N": n,
        "queries": q,
        "chunk": c,
        "p": p,
        "all train grads GiB": n * p * 4 / 2**30,
        "one chunk MiB": c * p * 4 / MIB,
        "query grads MiB": q * p * 4 / MIB,
        "scores N×Q MiB": n * q * 4 / MIB,
        "baseline MiB": r["baseline"],
        "peak fit MiB": r["rss"]["fit"],
        "peak query MiB": r["rss"]["query"],
        "peak train+scores MiB": r["rss"]["train"],
        "train+scores − baseline MiB": r["rss"]["train"] - r["baseline"],
        "max live chunks": r["max_live_chunks"],
        "ru_maxrss MiB": r["ru_maxrss"],
        "wall fit/query/train s": f"{w['fit']:.0f} / {w['query']:.0f} / {w['train']:.0f}",
        "CPU fit/query/train s": f"{cp['fit']:.0f} / {cp['query']:.0f} / {cp['train']:.0f}",
        "CPU total s": r["cpu_total"],
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1, help="(t, ε) draws S everywhere")
    ap.add_argument("--method", default="kfac-influence")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--train-steps",
        type=int,
        default=300,
        help="base-model steps (digits-10); memory and cost do not depend on the weights",
    )
    ap.add_argument("--no-cache", action="store_true", help="no cache_dir (no gradient cache)")
    ap.add_argument("--quick", action="store_true", help="smoke run: N 128/512, 32 queries")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return []
    torch.set_num_threads(a.threads)
    if a.quick:
        a.sizes, a.queries = [128, 512], 32
    rows = []
    for n in a.sizes:
        spec = {
            "n": n,
            "queries": a.queries,
            "samples": a.samples,
            "method": a.method,
            "chunk_size": a.chunk_size,
            "threads": a.threads,
            "train_steps": a.train_steps,
            "cache": not a.no_cache,
        }
        rows.append(row(spec, run_child(spec)))
        print(f"done N={n}", file=sys.stderr, flush=True)
    p = rows[0]["p"]
    print(
        header(
            f"peak RSS per phase: {a.method}, digits-10 cycled to N, {a.queries} queries, "
            f"S={a.samples}, chunk {a.chunk_size}, p={p} parameters, "
            f"gradient cache {'off' if a.no_cache else 'on'}"
        )
    )
    print()
    print(table(rows, COLUMNS))
    lo, hi = rows[0], rows[-1]
    grow = hi["peak train+scores MiB"] - lo["peak train+scores MiB"]
    print()
    print(
        f"SUMMARY memory: {a.method} N={hi['N']}×{a.queries} queries: peak RSS "
        f"train+scores {hi['peak train+scores MiB']:.0f} MiB (fit {hi['peak fit MiB']:.0f}, "
        f"query {hi['peak query MiB']:.0f}) vs {hi['all train grads GiB']:.2f} GiB for all "
        f"training gradients; one chunk {hi['one chunk MiB']:.1f} MiB, at most "
        f"{max(r['max live chunks'] for r in rows)} chunks alive; N ×{hi['N'] / lo['N']:.1f} "
        f"({lo['N']}→{hi['N']}) changed the train+scores peak by {grow:+.0f} MiB "
        f"(all gradients would add {(hi['all train grads GiB'] - lo['all train grads GiB']) * 1024:.0f} MiB)"
    )
    return rows


if __name__ == "__main__":
    main()
