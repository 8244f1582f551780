"""LDS-style retraining of M small DDPM models: one by one vs ``train_ensemble`` vs Ray.

The models are the ones the LDS harness trains: each keeps a random half of the training set
(``kept_fraction`` 0.5, so ``scale_steps`` halves the step count) and has its own seed. Three
ways, timed in one process (the machine may be shared: compare the ratios of one run):

* ``one-by-one``: ``task.train(task.build_model(seed), weights, seed)`` for each model in turn;
* ``train_ensemble``: all M models stacked (``torch.func.stack_module_state`` + ``vmap``), one
  Adam over the stacked leaves — the same draws per model as one-by-one;
* ``ray``: the one-by-one job per model through :class:`attribution_core.builtin.executors.
  RayExecutor` (local instance, ``num_cpus`` = cores, one thread per task).

The step count is reduced (``--steps``) so the run fits a few minutes; the per-step cost, hence
the speed-up, does not depend on it. Agreement: the largest parameter difference between the
batched and the one-by-one models is reported (they should agree to float32 round-off).

    .venv/bin/python benchmarks/perf/retrain.py [--models 64] [--steps 20] [--no-ray] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch
from _common import header, table

from attribution_core.registry import get_registry


def train_one(item: tuple[Any, np.ndarray, int]) -> dict[str, np.ndarray]:
    """One model (the Ray task and the one-by-one loop): ``(task, weights (N,), seed)``."""
    task, weights, seed = item
    torch.set_num_threads(1)
    model = task.train(task.build_model(seed), torch.as_tensor(weights), seed)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def make_task(
    classes: list[int], steps: int, n_train: int | None, width: int = 16, batch_size: int = 64
) -> Any:
    reg = get_registry()
    opts = {"classes": classes, "train_steps": steps, "width": width, "batch_size": batch_size}
    if n_train:
        opts["n_train"] = n_train
    opts = reg.validate_options("task", "ddpm-digits", opts, where="task")
    return reg.get("task", "ddpm-digits").factory(
        dtype=torch.float32, device=torch.device("cpu"), **opts
    )


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--models", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="train_steps (halved by scale_steps)")
    ap.add_argument("--width", type=int, default=16, help="U-Net base channels")
    ap.add_argument("--batch-size", type=int, default=64, help="training minibatch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 4 models, 4 steps, 64 examples"
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    n_train = None
    if a.quick:
        a.models, a.steps, n_train = 4, 4, 64
    task = make_task(a.classes, a.steps, n_train, a.width, a.batch_size)
    n = task.n_train
    rng = np.random.default_rng(0)
    masks = np.zeros((a.models, n), dtype=np.float32)
    for m in range(a.models):
        masks[m, rng.choice(n, n // 2, replace=False)] = 1.0
    seeds = [1000 + m for m in range(a.models)]
    n_params = sum(p.numel() for p in task.build_model(0).parameters())
    rows = []

    t0 = time.perf_counter()
    single = [train_one((task, masks[m], seeds[m])) for m in range(a.models)]
    t_single = time.perf_counter() - t0
    rows.append(
        {
            "way": "one-by-one",
            "models": a.models,
            "seconds": t_single,
            "speed-up": 1.0,
            "max abs Δθ vs one-by-one": 0.0,
        }
    )
    print(f"  one-by-one: {t_single:.1f} s", flush=True)

    t0 = time.perf_counter()
    batched = task.train_ensemble(torch.as_tensor(masks), seeds)
    t_batch = time.perf_counter() - t0
    diff = max(
        float(np.abs(v.detach().numpy() - single[m][k]).max())
        for m, model in enumerate(batched)
        for k, v in model.state_dict().items()
    )
    rows.append(
        {
            "way": "train_ensemble (batched)",
            "models": a.models,
            "seconds": t_batch,
            "speed-up": t_single / t_batch,
            "max abs Δθ vs one-by-one": diff,
        }
    )
    print(f"  train_ensemble: {t_batch:.1f} s", flush=True)

    if not a.no_ray:
        from attribution_core.builtin.executors import RayExecutor

        ex = RayExecutor(num_cpus=os.cpu_count(), cpus_per_task=1.0, shutdown=True)
        items = [(task, masks[m], seeds[m]) for m in range(a.models)]
        t0 = time.perf_counter()
        out: list[Any] = [None] * a.models
        for i, res in ex.map(train_one, items):
            out[i] = res
        t_ray = time.perf_counter() - t0
        diff_r = max(
            float(np.abs(out[m][k] - single[m][k]).max())
            for m in range(a.models)
            for k in single[m]
        )
        rows.append(
            {
                "way": f"ray ({os.cpu_count()} workers, 1 thread each, incl. start-up)",
                "models": a.models,
                "seconds": t_ray,
                "speed-up": t_single / t_ray,
                "max abs Δθ vs one-by-one": diff_r,
            }
        )
        print(f"  ray: {t_ray:.1f} s", flush=True)

    steps = max(1, round(a.steps * 0.5))
    print(
        header(
            f"retraining {a.models} DDPM models (digits-{len(a.classes)}, N={n}, "
            f"{n_params} params, {steps} Adam steps of batch {a.batch_size} each, half the data kept)",
            ("ray",),
        )
    )
    print()
    print(table(rows))
    print()
    print(
        f"SUMMARY retrain: train_ensemble {t_single / t_batch:.2f}× faster than one-by-one "
        + ("" if a.no_ray else f"(ray {rows[-1]['speed-up']:.2f}×) ")
        + f"for {a.models} models on {os.cpu_count()} cores, no GPU"
    )
    return rows


if __name__ == "__main__":
    main()
