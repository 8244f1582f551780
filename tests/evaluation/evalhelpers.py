"""Shared test data for tests/evaluation (imported by name: no package)."""

from __future__ import annotations

LIN = {
    "task": {"name": "linear-regression", "n_train": 40, "dim": 4},
    "queries": {"source": "generated", "count": 5, "seed": 0},
    "methods": ["grad-dot", "dense-influence"],
    "target": "mse",
    "dtype": "float64",
    "evaluation": {"lds": {"subsets": 12, "seeds": 2, "kept_fraction": 0.5, "batch": 4}},
}
