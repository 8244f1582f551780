"""Helpers for plugin authors' tests (the way pytest ships pytester)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from typer.testing import CliRunner

from attribution_core.build import build_method
from attribution_core.cli import app
from attribution_core.config import MethodConfig
from attribution_core.methods import resolve_method
from attribution_core.registry import Registry, get_registry

LINEAR_GD_TASK = {
    "name": "linear-regression",
    "n_train": 25,
    "dim": 3,
    "solver": "gd",
    "steps": 15,
}
"""``linear-regression`` trained by 15 steps of gradient descent: replayable in milliseconds."""

TINY_DDPM_OPTIONS = {"width": 2, "channel_mult": [1], "T": 10, "n_train": 6, "train_steps": 5}
"""``ddpm-digits`` options of a DDPM that trains in milliseconds (exactness tests)."""


def make_registry(*plugins: Any, entry_points: bool = True) -> Registry:
    """A fresh registry with ``plugins`` registered explicitly (plus entry points if asked)."""
    return get_registry(plugins, entry_points=entry_points)


def allclose_report(
    actual: Any, expected: Any, rtol: float = 1e-7, atol: float = 0.0, max_rows: int = 5
) -> str:
    """Empty string if ``actual ≈ expected`` elementwise, else a report of the worst entries."""
    a = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    b = (
        expected.detach().cpu().numpy()
        if isinstance(expected, torch.Tensor)
        else np.asarray(expected)
    )
    if a.shape != b.shape:
        return f"shape mismatch: expected {b.shape}, got {a.shape}."
    err = np.abs(a - b)
    tol = atol + rtol * np.abs(b)
    bad = np.argwhere(err > tol)
    if not len(bad):
        return ""
    worst = sorted(bad.tolist(), key=lambda i: -err[tuple(i)])[:max_rows]
    rows = ", ".join(f"{tuple(i)}: {a[tuple(i)]:.6g} vs {b[tuple(i)]:.6g}" for i in worst)
    return (
        f"{len(bad)}/{a.size} entries differ (max abs {err.max():.3g}, "
        f"max rel {(err / np.maximum(np.abs(b), 1e-300)).max():.3g}); worst: {rows}"
    )


def run_cli(*args: str) -> tuple[int, str]:
    """Run ``attribution ARGS`` in-process: ``(exit_code, stdout + stderr)``."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def write_config(path: str | Path, config: Mapping[str, Any]) -> Path:
    """Write ``config`` as a YAML file at ``path``; returns the path."""
    path = Path(path)
    path.write_text(yaml.safe_dump(dict(config)))
    return path


def run_attribute(config: Mapping[str, Any], out: str | Path, *args: str) -> tuple[int, str]:
    """Write ``config`` to ``<out>.yaml`` and run ``attribution attribute <out>.yaml --out OUT
    ARGS`` in-process: ``(exit_code, stdout + stderr)``."""
    out = Path(out)
    path = write_config(out.with_name(f"{out.name}.yaml"), config)
    return run_cli("attribute", str(path), "--out", str(out), *args)


def build_scorer(entry: Any, task: Any, *, seed: int = 0, registry: Registry | None = None) -> Any:
    """The scorer of one method entry (a name or a ``{name, ...}`` dict), built for ``task``.

    Resolves and builds exactly as ``attribute`` does (``resolve_method`` then ``build_method``).
    """
    reg = registry or get_registry()
    cfg = MethodConfig(name=entry) if isinstance(entry, str) else MethodConfig(**dict(entry))
    spec = resolve_method(cfg, reg, run_seed=seed, where="methods[0]")
    return build_method(spec, reg, task).scorer


class MatrixStream:
    """Training gradients from an in-memory ``(n, k)`` matrix, in the form ``FitInputs``
    gives them (``chunks()`` yields ``(rows, G)``): for testing Hessians on given rows."""

    def __init__(self, matrix: torch.Tensor, chunk_size: int = 64) -> None:
        self.matrix = matrix
        self.chunk_size = chunk_size

    def chunks(self, *, progress: bool = False, desc: str = "") -> Any:
        """Yield ``(rows, matrix[rows])`` in chunks of ``chunk_size``."""
        n = self.matrix.shape[0]
        for start in range(0, n, self.chunk_size):
            rows = slice(start, min(start + self.chunk_size, n))
            yield rows, self.matrix[rows]


def linear_module_task(n: int = 20, steps: int = 5) -> Any:
    """A tiny float64 :class:`~attribution_core.wrap.ModuleTask` (``nn.Linear(3, 1)``, MSE,
    ``n`` examples, 2 queries): a task *without* the training-step hook, for refusal tests."""
    from torch import nn

    from attribution_core.wrap import ModuleTask

    X = torch.randn(n, 3, dtype=torch.float64)
    return ModuleTask(
        model_fn=lambda seed: nn.Linear(3, 1).double(),
        train_data={"x": X, "y": X.sum(1)},
        loss="mse",
        queries={"x": X[:2], "y": X[:2].sum(1)},
        steps=steps,
    )
