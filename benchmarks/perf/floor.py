"""The compute floor: plain batched forward+backward of the DDPM U-Net over N·S (example, draw) rows.

Every influence method runs at least one forward+backward per (training example, Monte-Carlo
draw) pair; K-FAC influence about two (curvature fit + training gradients). This script measures
the plain throughput (batches of 64 rows, summed-loss backward, no per-example gradients) that
every other perf result is divided by.

    .venv/bin/python benchmarks/perf/floor.py [--classes 0 1] [--samples 8] [--quick]
"""

from __future__ import annotations

import argparse

import torch
from _common import build, floor_seconds, header, table, task_options


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--samples", type=int, default=8, help="S: draws per training example")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 examples, S=2, 1 repeat")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    extra = {"n_train": 64, "train_steps": 20} if a.quick else {}
    if a.quick:
        a.samples, a.repeats = 2, 1
    task, model, _ = build(task_options(a.classes, **extra))
    n = task.n_train
    n_params = sum(p.numel() for p in model.parameters())
    sec = floor_seconds(model, task, a.samples, a.batch, a.repeats)
    rows = [
        {
            "classes": "".join(map(str, a.classes)),
            "N": n,
            "S": a.samples,
            "rows N·S": n * a.samples,
            "params": n_params,
            "batch": a.batch,
            "floor s": sec,
            "rows/s": n * a.samples / sec,
        }
    ]
    print(header("floor: plain forward+backward, N·S rows in batches of 64"))
    print()
    print(table(rows))
    print()
    print(
        f"SUMMARY floor: {n * a.samples} fwd+bwd rows in {sec:.2f} s "
        f"({n * a.samples / sec:.0f} rows/s, best of {a.repeats})"
    )
    return rows


if __name__ == "__main__":
    main()
