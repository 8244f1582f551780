"""kill -9 of `suite build` at two points, then resume: same truth, nothing finished redone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attribution_core.testing import write_config

CFG = {
    "task": {"name": "digits-classifier", "n_train": 80, "hidden": 8, "steps": 150},
    "queries": {"source": "generated", "count": 4, "seed": 0},
    "methods": ["grad-dot"],
    "target": "cross-entropy",
    "evaluation": {
        "lds": {"subsets": 8, "seeds": 2, "batch": 1},
        "targets": ["cross-entropy", "margin"],
    },
}
N_RUNS = 2 + 8 * 3


def _cmd(config: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).parent / "attribution"
    return [str(exe), "suite", "build", str(config), "--out", str(out), "--quiet"]


def _finished(out: Path) -> dict[str, tuple[int, int]]:
    runs = out / "runs"
    if not runs.is_dir():
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in runs.glob("[!.]*.npy")}


def _kill_after(
    config: Path, out: Path, n_files: int, timeout: float = 240.0
) -> dict[str, tuple[int, int]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _cmd(config, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    start = time.monotonic()
    while len(_finished(out)) < n_files:
        assert proc.poll() is None, (
            f"build ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
        )
        assert time.monotonic() - start < timeout
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return _finished(out)


@pytest.mark.slow  # four CLI starts and ~50 trainings: ~1 min idle, ~3.5 min on a loaded 2-core box
def test_kill9_twice_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", CFG)
    out = tmp_path / "killed"
    before1 = _kill_after(config, out, 4)
    assert len(before1) < N_RUNS
    before2 = _kill_after(config, out, len(before1) + 8)
    assert len(before2) < N_RUNS
    # finished files of the first run survived the second kill untouched (same inode, mtime)
    assert all(before2[k] == v for k, v in before1.items())
    done = subprocess.run(_cmd(config, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _finished(out)
    assert len(after) == N_RUNS
    assert all(after[k] == v for k, v in before2.items())  # nothing finished was recomputed
    assert not list((out / "runs").glob(".*"))  # no half-written leftovers

    clean = tmp_path / "clean"
    ref = subprocess.run(_cmd(config, clean), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    for tid in ("cross-entropy", "margin"):
        for folder, suffix in (("truth", ""), ("truth", ".stderr"), ("oracle", ""), ("full", "")):
            a = np.load(out / folder / f"{tid}{suffix}.npy")
            b = np.load(clean / folder / f"{tid}{suffix}.npy")
            np.testing.assert_array_equal(a, b)  # same seeds, same thread count: same bits
    np.testing.assert_array_equal(np.load(out / "masks.npy"), np.load(clean / "masks.npy"))


def test_half_written_file_is_not_finished(tmp_path: Path) -> None:
    from attribution_core.evaluation.runs import RunStore

    store = RunStore(tmp_path / "runs", (1, 2, 3))
    (tmp_path / "runs" / "a.npy").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr'")  # truncated header
    (tmp_path / "runs" / ".b.npy.x.tmp.npy").write_bytes(b"partial")
    assert store.load("a") is None
    store = RunStore(tmp_path / "runs", (1, 2, 3))  # a restart sweeps temp files
    assert not (tmp_path / "runs" / ".b.npy.x.tmp.npy").exists()
    store.save("a", np.ones((1, 2, 3)))
    np.testing.assert_array_equal(store.load("a"), np.ones((1, 2, 3)))
