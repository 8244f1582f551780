"""kill -9 during a single-model suite build, then resume: identical truth, nothing finished
recomputed (issue 17, acceptance 5); the resumed suite's leave-one-out row is recomputed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from attribution_core.evaluation.bench import bench
from attribution_core.evaluation.suite import build_suite
from attribution_core.testing import write_config

CFG = {
    "task": {"name": "digits-classifier", "n_train": 30, "hidden": 8, "steps": 100},
    "queries": {"source": "generated", "count": 3, "seed": 0},
    "methods": ["grad-dot", "exact-retraining"],
    "target": "cross-entropy",
    "evaluation": {
        "lds": {
            "protocol": "single-model",
            "subsets": 8,
            "kept_fraction": 0.9,
            "cross_seeds": 1,
            "cross_seed_scope": "init+stream",
            "batch": 1,
        },
        "loo": True,
    },
}
N_RUNS = 1 + 8 + (1 + 8) + 30  # base measurement, subsets, cross seed (full + masks), loo
ARRAYS = ("truth/cross-entropy.npy", "cross/cross-entropy.npy", "loo/cross-entropy.npy")


def _finished(out: Path) -> dict[str, tuple[int, int]]:
    runs = out / "runs"
    if not runs.is_dir():
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in runs.glob("[!.]*.npy")}


def test_kill9_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = write_config(tmp_path / "c.yaml", CFG)
    out = tmp_path / "killed"
    exe = Path(sys.executable).parent / "attribution"
    cmd = [str(exe), "suite", "build", str(config), "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.monotonic()
    try:
        while len(_finished(out)) < 6:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() - start < 240
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _finished(out)
    assert 6 <= len(before) < N_RUNS
    assert not (out / "truth").exists()

    build_suite(CFG, out, command="pytest")  # resume
    after = _finished(out)
    assert len(after) == N_RUNS
    assert all(after[k] == v for k, v in before.items())  # nothing finished was recomputed
    assert not list((out / "runs").glob(".*"))

    clean = tmp_path / "clean"
    build_suite(CFG, clean, command="pytest")
    for name in ARRAYS:
        np.testing.assert_array_equal(np.load(out / name), np.load(clean / name))

    data = {**CFG, "evaluation": {**CFG["evaluation"], "suite": str(out)}}
    table = bench(data, tmp_path / "bench", n_boot=50).set_index("label")
    assert table.loc["exact-retraining", "lds_mean"] == 1.0
    masks = np.load(out / "masks.npy")
    effects = np.load(out / "loo" / "cross-entropy.npy") - np.load(out / "full/cross-entropy.npy")
    expected = (~masks).astype(np.float64) @ effects
    np.testing.assert_allclose(
        np.load(tmp_path / "bench" / "leave-one-out" / "predictions.npy"), expected, rtol=1e-12
    )
    assert pd.notna(table.loc["leave-one-out", "lds_cross_seed"])
