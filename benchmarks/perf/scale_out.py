"""Scale-out (issue 20): N = 20,000 training examples × 1,000 queries, local vs Ray, peak RSS.

The task is ``ddpm-digits`` on the ten digit classes with ``n_train: 20000, cycle: true`` — a
task option, so every Ray worker that builds the task sees the same rows (the task object is
never patched). Queries are the first Q training images (``queries: {source: train}``: what the
queries are does not change the work), one Monte-Carlo draw (S = 1). Each configuration runs
``attribute`` in a fresh child process with a fresh gradient cache (the base model is trained
once and loaded from ``model.path``):

* ``local-1``: the local executor, ``threads: 1``;
* ``local-2``: the local executor, ``threads: 2``;
* ``ray-2``: a local Ray instance with 2 workers (``num_cpus: 2``), one thread per task.

All use the same ``shards`` (so the ``ray-2`` scores equal ``local-1``'s bit for bit, checked
here). A sampler in the child records, every 0.2 s, the resident set size of the driver and of
every Ray process started during the run (``ray::`` workers, raylet, GCS); "anon" is RSS minus
file-backed/shared pages (the memory-mapped ``scores.npy`` is file-backed). Two more sweeps show
that peak RSS is flat: in N (2,000 vs 20,000, full scores, local-1) and in Q with ``topk``
(Q/10 vs Q at N = 2,000).

    .venv/bin/python benchmarks/perf/scale_out.py [--quick] [--method trak]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import build, header, table, task_options

MIB = 2**20


class TreeSampler:
    """Peak RSS (and RSS − shared) per process: the driver, and every ``ray`` process new
    since start (workers are children of the raylet, not of the driver)."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.psutil, self.interval = psutil, interval
        self.me = psutil.Process()
        self.before = {p.pid for p in psutil.process_iter()}
        self.peak: dict[int, tuple[str, float, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _procs(self) -> list[Any]:
        found = [self.me]
        for p in self.psutil.process_iter(["name", "cmdline"]):
            if p.pid in self.before:
                continue
            text = " ".join(p.info.get("cmdline") or []) + (p.info.get("name") or "")
            if "ray" in text:
                found.append(p)
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self._procs():
                try:
                    mem = p.memory_info()
                    name = "driver" if p.pid == self.me.pid else (p.name() or "ray")
                except self.psutil.Error:
                    continue
                old = self.peak.get(p.pid, (name, 0.0, 0.0))
                anon = (mem.rss - getattr(mem, "shared", 0)) / MIB
                self.peak[p.pid] = (name, max(old[1], mem.rss / MIB), max(old[2], anon))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        """Driver peak RSS/anon and the largest peak among Ray worker processes."""
        driver = self.peak.get(self.me.pid, ("driver", float("nan"), float("nan")))
        workers = [v for pid, v in self.peak.items() if pid != self.me.pid and "::" in v[0]]
        return {
            "driver_rss_mib": driver[1],
            "driver_anon_mib": driver[2],
            "worker_rss_mib": max((w[1] for w in workers), default=float("nan")),
            "worker_anon_mib": max((w[2] for w in workers), default=float("nan")),
            "ray_processes": len(self.peak) - 1,
        }


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured run (its own process)."""
    from attribution_core import attribute

    with tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
        cfg = {
            "task": spec["task"],
            "model": {"path": spec["model_path"]},
            "queries": {"source": "train", "count": spec["queries"]},
            "target": {"name": "loss", "n_samples": 1},
            "methods": [spec["method"]],
            "threads": spec["threads"],
            "shards": spec["shards"],
            "cache_dir": str(Path(tmp) / "cache"),
            "topk": spec.get("topk"),
            "query_block": spec.get("query_block"),
            "executor": spec["executor"],
        }
        with TreeSampler() as rss:
            t0 = time.perf_counter()
            res = attribute(cfg, out=Path(tmp) / "out")
            wall = time.perf_counter() - t0
            time.sleep(0.3)
        if spec["executor"]["name"] == "ray":
            import ray

            ray.shutdown()
        label = next(iter(res.manifests))
        scores = res.scores[label]
        digest = None
        if spec.get("topk") is None:
            digest = float(np.asarray(scores, dtype=np.float64).sum())
            if spec.get("save_scores"):
                np.save(spec["save_scores"], np.asarray(scores))
        man = res.manifests[label]
    return {
        "wall_s": wall,
        **rss.summary(),
        "timings": man["timings"],
        "shards": man["shards"],
        "checksum": digest,
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """``child(spec)`` in a fresh process; its JSON result."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="N = 2,000 / 200, Q = 100 (a smoke).")
    ap.add_argument("--method", default="trak")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results/scale_out.json")
    ap.add_argument("--only", help="run only the rows whose name contains this text")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    big, small, q = (2000, 200, 100) if args.quick else (20000, 2000, 1000)
    rows, raw = [], {}
    local = {"name": "local"}
    ray_ex = {"name": "ray", "num_cpus": 2}
    plan = [
        ("local-1", big, q, 1, local, None),
        ("local-2", big, q, 2, local, None),
        ("ray-2", big, q, 1, ray_ex, None),
        ("local-1 (N small)", small, q, 1, local, None),
        ("local-1 topk 10 (N small, Q/10)", small, q // 10, 1, local, 10),
        ("local-1 topk 10 (N small)", small, q, 1, local, 10),
        ("local-1 topk 10 (N small, Q/10), query_block Q/10", small, q // 10, 1, local, 10),
        ("local-1 topk 10 (N small), query_block Q/10", small, q, 1, local, 10),
    ]
    plan = [row for row in plan if args.only is None or args.only in row[0]]
    with tempfile.TemporaryDirectory(prefix="scale-out-scores-") as keep:
        for name, n, nq, threads, executor, topk in plan:
            opts = task_options(list(range(10)), train_steps=args.train_steps, n_train=n)
            opts["cycle"] = True
            _, _, path = build(opts)
            spec = {
                "task": opts, "model_path": str(path), "queries": nq, "method": args.method,
                "threads": threads, "shards": args.shards, "executor": executor, "topk": topk,
                "save_scores": f"{keep}/{name}.npy" if name in ("local-1", "ray-2") else None,
                "query_block": q // 10 if "query_block" in name else None,
            }  # fmt: skip
            res = run(spec)
            raw[name] = res
            rows.append({"run": name, "N": n, "Q": nq, "topk": topk or "", **_row(res)})
            print(json.dumps(rows[-1]), flush=True)
        pair = [f"{keep}/{n}.npy" for n in ("local-1", "ray-2")]
        same = all(Path(f).is_file() for f in pair) and np.array_equal(*map(np.load, pair))
    base = raw["local-1"]["wall_s"] if "local-1" in raw else float("nan")
    for r in rows:
        r["speed-up vs local-1"] = base / r["wall_s"] if r["N"] == big and r["Q"] == q else ""
    print(header(f"Scale-out: {args.method}, N = {big}, Q = {q}, S = 1, shards {args.shards}"))
    cols = ["run", "N", "Q", "topk", "wall_s", "speed-up vs local-1", "driver_rss_mib",
            "driver_anon_mib", "worker_rss_mib", "worker_anon_mib"]  # fmt: skip
    print(table(rows, cols))
    if "ray-2" in raw:
        print(f"\nray-2 scores equal local-1 bit for bit: {same}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "raw": raw, "bitwise": same}, indent=1))


def _row(res: dict[str, Any]) -> dict[str, Any]:
    keys = ("wall_s", "driver_rss_mib", "driver_anon_mib", "worker_rss_mib", "worker_anon_mib")
    return {k: res[k] for k in keys}


if __name__ == "__main__":
    main()
