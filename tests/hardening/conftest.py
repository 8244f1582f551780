"""Fixtures of the hardening tests: a tiny linear-regression config, its suite, CLI processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

LIN = {
    "task": {"name": "linear-regression", "n_train": 40, "dim": 4},
    "queries": {"source": "generated", "count": 5, "seed": 0},
    "methods": ["grad-dot", "dense-influence"],
    "target": "mse",
    "dtype": "float64",
    "evaluation": {"lds": {"subsets": 12, "seeds": 2, "kept_fraction": 0.5, "batch": 4}},
}
"""A config every command runs in about a second (closed-form training)."""


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test remembers verified hashes in its own cache file (never in ~/.cache)."""
    path = tmp_path / "hash-cache.json"
    monkeypatch.setenv("ATTRIBUTION_HASH_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def lin_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built linear-regression suite (with file hashes in its suite.json)."""
    from attribution_core.evaluation.suite import build_suite

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hard-lin")
    os.environ.setdefault("ATTRIBUTION_HASH_CACHE", str(root / "hash-cache.json"))
    build_suite(LIN, root / "suite", command="pytest")
    return root / "suite"


def cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """Start ``attribution ARGS`` as a real process (stdout/stderr piped, text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "attribution_core.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def cli_run(*args: str, timeout: float = 120, **kwargs) -> tuple[int, str]:
    """Run ``attribution ARGS`` to the end: ``(exit code, stdout + stderr)``."""
    proc = cli(*args, **kwargs)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err
