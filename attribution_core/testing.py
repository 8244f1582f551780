"""Helpers for plugin authors' tests (the way pytest ships pytester)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from attribution_core.registry import Registry, get_registry


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
    from typer.testing import CliRunner

    from attribution_core.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output
