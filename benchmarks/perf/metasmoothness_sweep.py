"""Metasmoothness sweep over ``ddpm-digits`` recipes (issue 18, "smoothness first").

For each recipe (today's; Adam ε = 1e-4, 1e-3, 1e-2, 1e-1; plain SGD): the Def. 2 score at each h
(:func:`attribution_core.evaluation.metasmoothness.def2_scores`, float64, model seed 0,
direction seed 0), the final training loss (mean ε-loss over the training set, 16 fixed draws
per example) and a grid of 16 samples (PNG under ``benchmarks/results/figures/``).

Resumable and bounded: every finished h is written to ``OUT_DIR/<recipe>.json`` at once (a
rerun skips what is there and retrains only θ₀); after the first training of a recipe the time
of the rest is estimated and h values are dropped (last first: 1e-2 is measured first) when it
would exceed ``--budget-min``; such a recipe is ``partial`` and a rerun with a larger budget
completes it (``--h`` picks the h values). ``--report`` turns the JSON files into a markdown table.

    nohup .venv/bin/python benchmarks/perf/metasmoothness_sweep.py today eps1e-3 &
    nohup .venv/bin/python benchmarks/perf/metasmoothness_sweep.py eps1e-1 --h 0.01 0.1 &
    .venv/bin/python benchmarks/perf/metasmoothness_sweep.py --report
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from attribution_diffusion import DDPMDigitsTask
from attribution_diffusion.figures import save_grid

from attribution_core import example_noise, train_single_model
from attribution_core.evaluation.metasmoothness import def2_scores, included_vector
from attribution_core.storage import atomic_write_json

# benchmarks/digits2.yaml's pinned task options (the suite's recipe), in float64
DIGITS2 = {
    "classes": [0, 1],
    "T": 1000,
    "width": 16,
    "channel_mult": [1, 2],
    "train_steps": 1000,
    "batch_size": 64,
    "lr": 0.002,
    "scale_steps": True,
}
RECIPES: dict[str, dict[str, Any]] = {
    "today": {"adam_eps": 1e-8},  # torch's ε, the ddpm-digits default until the sweep chose 1e-2
    "eps1e-3": {"adam_eps": 1e-3},
    "eps1e-4": {"adam_eps": 1e-4},
    "eps1e-2": {"adam_eps": 1e-2},
    "eps1e-1": {"adam_eps": 1e-1},
    "sgd": {"optimizer": "sgd", "lr": 0.003},  # lr 0.01 diverges (NaN loss, float32 probe)
}
HS = (1e-2, 1e-1, 1e-3)  # the acceptance h first
ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "benchmarks" / "results" / "metasmoothness"
FIGURES = ROOT / "benchmarks" / "results" / "figures"


def training_loss(task: DDPMDigitsTask, model: torch.nn.Module, n_samples: int = 16) -> float:
    """Mean ε-loss over the training set, draws fixed per example (stream ``target``, seed 0)."""
    meas = task.training_loss(n_samples)
    data = task.train_data()
    noise = example_noise(meas, data, 0, "target", 0)
    with torch.no_grad():
        vals = [
            meas.evaluate(
                model, {"x": data["x"][a : a + 64]}, {k: v[a : a + 64] for k, v in noise.items()}
            )
            for a in range(0, task.n_train, 64)
        ]
    return float(torch.cat(vals).mean())


def run_recipe(name: str, budget_min: float, log, hs: tuple[float, ...] = HS) -> None:
    """Measure one recipe, writing ``OUT_DIR/<name>.json`` after every finished piece."""
    path = OUT_DIR / f"{name}.json"
    rec: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    rec.setdefault("recipe", name)
    rec.setdefault("options", {**DIGITS2, **RECIPES[name]})
    rec.setdefault("def2", [])
    task = DDPMDigitsTask(dtype=torch.float64, **rec["options"])
    ones = torch.ones(task.n_train, dtype=torch.float64)
    t0 = time.perf_counter()
    base = train_single_model(task, ones, 0)
    one = time.perf_counter() - t0
    rec["seconds_per_training"] = round(one, 1)
    log(f"[{name}] one training: {one:.0f} s")
    if "final_loss" not in rec:
        rec["final_loss"] = training_loss(task, base)
        x, _ = task.sample(base, 16, 0)
        fig = FIGURES / f"metasmoothness-{name}.png"
        save_grid(task.images({"x": x}), fig, f"{name}: 16 samples (seed 0)")
        rec["samples"] = str(fig.relative_to(ROOT))
        log(f"[{name}] final loss {rec['final_loss']:.4f}, samples -> {fig}")
        atomic_write_json(path, rec)
    done = {r["h"] for r in rec["def2"]}
    todo = [h for h in hs if h not in done]
    affordable = max(0, int((budget_min * 60 - (time.perf_counter() - t0)) // (2 * one)))
    if affordable < len(todo):
        rec["dropped_h"] = todo[affordable:]
        log(f"[{name}] budget {budget_min} min: dropping h {todo[affordable:]}")
        todo = todo[:affordable]
    theta0 = included_vector(base)
    for h in todo:
        (row,) = def2_scores(task, 0, [h], 0, theta0=theta0, log=lambda s: log(f"[{name}] {s}"))
        rec["def2"].append(row)
        atomic_write_json(path, rec)
    missing = [h for h in HS if h not in {r["h"] for r in rec["def2"]}]
    rec["dropped_h"] = missing
    rec["status"] = "partial" if missing else "done"
    atomic_write_json(path, rec)


def report() -> str:
    """The finished recipes as a markdown table."""
    lines = [
        "| recipe | options | Def. 2 h=1e-1 | h=1e-2 | h=1e-3 | final loss | s / training | samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in RECIPES:
        path = OUT_DIR / f"{name}.json"
        if not path.is_file():
            continue
        rec = json.loads(path.read_text())
        by_h = {r["h"]: r["score"] for r in rec["def2"]}
        cells = [f"{by_h[h]:.3f}" if h in by_h else "—" for h in (1e-1, 1e-2, 1e-3)]
        cells = [c.replace("—", "— (not run)") for c in cells]
        opts = json.dumps(RECIPES[name]) if RECIPES[name] else "today's"
        lines.append(
            f"| {name} | {opts} | {' | '.join(cells)} | {rec.get('final_loss', float('nan')):.4f} "
            f"| {rec.get('seconds_per_training', '?')} | {rec.get('samples', '—')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the named recipes in order (default: all), or print the report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="*", default=list(RECIPES), help=f"of {list(RECIPES)}")
    p.add_argument("--budget-min", type=float, default=40.0, help="per recipe")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--h", type=float, nargs="+", default=list(HS), help="h values, in order")
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    if args.report:
        print(report())
        return
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
        p.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    torch.set_num_threads(args.threads)
    OUT_DIR.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(time.strftime("%H:%M:%S"), line, flush=True)

    for name in args.recipes:
        path = OUT_DIR / f"{name}.json"
        rec = json.loads(path.read_text()) if path.is_file() else {}
        if rec.get("status") == "done" and not rec.get("dropped_h"):
            log(f"[{name}] done already")
            continue
        run_recipe(
            name, args.budget_min, log, tuple(args.h)
        )  # resumes a partial recipe (retrains θ₀)


if __name__ == "__main__":
    main()
