"""Shared helpers of the perf scripts: machine record, the DDPM set-up, RSS sampling, floor.

Everything here is measurement plumbing; the numbers it produces are only meaningful as ratios
taken in one process (the machine these scripts were written on is shared with other jobs).
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

CACHE = Path(os.environ.get("PERF_CACHE", "/tmp/attribution-perf"))
"""Where trained base models and fixed query files are kept between runs (never committed)."""


# ---- machine record -------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU model, cores, load average, torch threads, GPU presence, date (UTC)."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "host": platform.node(),
    }


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the packages a perf result depends on."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "numpy", "curvlinops-for-pytorch", *extra):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        out["git"] = rev or "?"
    except OSError:
        out["git"] = "?"
    return out


def header(title: str, extra_versions: tuple[str, ...] = ()) -> str:
    """A markdown preamble: title, machine and versions (printed before every table)."""
    m, v = machine(), versions(extra_versions)
    lines = [f"### {title}", ""]
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
        f"cuda {m['cuda']}, load avg (1 min) {m['load_avg_1m']} — shared machine; {m['date']}"
    )
    lines.append("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows of dicts as a markdown table (floats to 3 significant digits)."""
    if not rows:
        return "(no rows)"
    cols = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


# ---- memory ---------------------------------------------------------------------------------
class RSSSampler:
    """Samples this process's resident set size every ``interval`` s in a background thread.

    ``peak(t0, t1)`` is the largest sample taken in ``[t0, t1]`` (``time.perf_counter`` clock),
    in MiB; together with phase timings this gives a peak RSS per phase.
    """

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self._proc.memory_info().rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, t0: float, t1: float) -> float:
        """Largest RSS (MiB) sampled between ``t0`` and ``t1``; NaN if none."""
        vals = [r for t, r in self.samples if t0 <= t <= t1]
        return max(vals) / 2**20 if vals else float("nan")


# ---- the DDPM set-up ------------------------------------------------------------------------
def task_options(classes: list[int], train_steps: int = 1400, **extra: Any) -> dict[str, Any]:
    """``ddpm-digits`` options used by every perf script (defaults of the pinned suite)."""
    return {"name": "ddpm-digits", "classes": classes, "train_steps": train_steps, **extra}


def build(task_opts: dict[str, Any], seed: int = 0):
    """``(task, model, model_path)``: the task and its base model, trained once and cached.

    The model is stored as ``CACHE/models/<key>.safetensors`` so later runs (and the pipeline,
    via ``model: {path: ...}``) load it instead of training.
    """
    from safetensors.torch import load_file, save_file

    from attribution_core.gradients import cache_key
    from attribution_core.registry import get_registry

    reg = get_registry()
    opts = {k: v for k, v in task_opts.items() if k != "name"}
    opts = reg.validate_options("task", task_opts["name"], opts, where="task")
    task = reg.get("task", task_opts["name"]).factory(
        dtype=torch.float32, device=torch.device("cpu"), **opts
    )
    # training does not use n_samples (the measurements' draw count): key the model without it
    described = {**task.describe(), "n_samples": 8}
    path = CACHE / "models" / f"{cache_key(task=described, seed=seed)}.safetensors"
    model = task.build_model(seed)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        model = task.base_model(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return task, model.eval(), path


def fixed_queries(task: Any, model: torch.nn.Module, model_path: Path, count: int) -> Path:
    """``count`` generated queries (DDPM samples, seed 0) saved once as an ``.npz``."""
    path = model_path.with_suffix(f".queries{count}.npz")
    if not path.is_file():
        q = task.make_queries(model, count, 0)
        np.savez(path, x=q["x"].numpy())
    return path


def eps_rows(task: Any, n_samples: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x_t, t, ε)`` for every (training example, draw) pair, example-major: ``N·S`` rows."""
    x = task.train_data()["x"]
    gen = torch.Generator().manual_seed(seed)
    x0 = x.repeat_interleave(n_samples, dim=0)
    t = torch.randint(1, task.schedule.T + 1, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    return task.schedule.noised(x0, t, eps), t, eps


def floor_times(
    model: torch.nn.Module, task: Any, n_samples: int, batch: int = 64, repeats: int = 1
) -> tuple[float, float]:
    """``(wall, cpu)`` seconds for plain forward+backward of ``‖ε − ε_θ(x_t, t)‖²`` over N·S rows.

    Batches of ``batch`` rows, parameter gradients accumulated as in training (no per-example
    gradients): the least work any influence method does per (example, draw) pair. Best of
    ``repeats``. ``cpu`` is this process's CPU time (``time.process_time``), which a shared
    machine disturbs much less than the wall clock.
    """
    xt, t, eps = eps_rows(task, n_samples)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(0, xt.shape[0], batch):
            model.zero_grad(set_to_none=True)
            out = model(xt[s : s + batch], t[s : s + batch])
            (out - eps[s : s + batch]).pow(2).sum().backward()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    model.zero_grad(set_to_none=True)
    return best, best_cpu


def floor_seconds(
    model: torch.nn.Module, task: Any, n_samples: int, batch: int = 64, repeats: int = 1
) -> float:
    """Wall seconds of :func:`floor_times`."""
    return floor_times(model, task, n_samples, batch, repeats)[0]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, fn())``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out
