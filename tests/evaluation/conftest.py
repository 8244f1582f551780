"""Fixtures: tiny suites built in seconds (linear regression trains in closed form)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from evalhelpers import LIN


@pytest.fixture(scope="session")
def lin_suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A built linear-regression suite and the config that built it."""
    from attribution_core.evaluation.suite import build_suite

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lin")
    build_suite(LIN, root / "suite", command="pytest")
    return root / "suite", LIN


@pytest.fixture(scope="session")
def lin_bench(lin_suite: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bench`` output on the linear-regression suite."""
    from attribution_core.evaluation.bench import bench

    suite, cfg = lin_suite
    data = {**cfg, "evaluation": {"suite": str(suite)}}
    out = tmp_path_factory.mktemp("linbench") / "out"
    bench(data, out, n_boot=200)
    return out
