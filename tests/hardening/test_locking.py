"""One writer per directory: flock locks, a second writer exits 2, SIGKILL leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import LIN, cli, cli_run

from attribution_core.locking import LockedError, directory_lock, holders
from attribution_core.pipeline import attribute
from attribution_core.testing import write_config

SLOW = {**LIN, "task": {**LIN["task"], "solver": "gd", "steps": 40_000, "lr": 0.05}}
"""LIN trained by 40k full-batch gradient-descent steps: seconds of work while the lock is held."""

HOLD = (
    "import sys, time\n"
    "from attribution_core.locking import directory_lock\n"
    "with directory_lock(sys.argv[1], exclusive=sys.argv[2] == 'x'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(60)\n"
)


def _holder(path: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), mode], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _wait_for_lock(path: Path, pid: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while pid not in holders(path):
        assert time.monotonic() < end, f"pid {pid} never locked {path}"
        time.sleep(0.05)


def test_second_writer_and_reader_are_refused_naming_the_pid(tmp_path: Path) -> None:
    proc = _holder(tmp_path / "out", "x")
    try:
        in_use = rf"'{tmp_path / 'out'}' is in use by pid {proc.pid}"
        with pytest.raises(LockedError, match=in_use), directory_lock(tmp_path / "out"):
            pass
        shared = directory_lock(tmp_path / "out", exclusive=False, what="suite")
        with pytest.raises(LockedError, match=rf"being written by pid {proc.pid}"), shared:
            pass
    finally:
        proc.kill()
        proc.wait()
    with directory_lock(tmp_path / "out"):  # released by the kernel when the holder died
        pass


def test_readers_share_and_a_writer_waits_for_none(tmp_path: Path) -> None:
    (tmp_path / "suite").mkdir()
    proc = _holder(tmp_path / "suite", "s")
    try:
        with directory_lock(tmp_path / "suite", exclusive=False):  # two readers: fine
            pass
        with pytest.raises(LockedError, match="in use by pid"), directory_lock(tmp_path / "suite"):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_reentrant_within_a_process(tmp_path: Path) -> None:
    d = tmp_path / "d"
    with directory_lock(d), directory_lock(d), directory_lock(d, exclusive=False):
        pass
    assert holders(tmp_path / "d") == []


def test_two_concurrent_cli_writers(tmp_path: Path) -> None:
    """The second exits 2 before any work, the first finishes, the result equals one run."""
    cfg = write_config(tmp_path / "cfg.yaml", SLOW)
    out = tmp_path / "out"
    first = cli("attribute", str(cfg), "--out", str(out), "--quiet")
    try:
        _wait_for_lock(out, first.pid)
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run, deterministically
        assert first.poll() is None, "the first writer finished before the test could stop it"
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        code, text = cli_run("attribute", str(cfg), "--out", str(out), "--quiet")
        assert code == 2, text
        assert f"'{out}' is in use by pid {first.pid}" in text
        assert "Traceback" not in text
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # no work done
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    single = attribute(SLOW, out=tmp_path / "single")
    for label, scores in single.scores.items():
        assert np.array_equal(np.load(out / label / "scores.npy"), scores.astype(np.float32))


def test_sigkilled_writer_leaves_no_stale_lock_and_the_next_run_resumes(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", LIN)
    out = tmp_path / "out"
    first = cli("attribute", str(cfg), "--out", str(out), "--quiet")
    _wait_for_lock(out, first.pid)
    end = time.monotonic() + 60
    done = out / "grad-dot" / "scores.npy"
    while not done.exists() and first.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    # finished = scores with their manifest (written last); only those may be reused
    kept = {
        p: p.stat().st_mtime_ns
        for p in out.glob("*/scores.npy")
        if (p.parent / "manifest.json").is_file()
    }
    code, text = cli_run("attribute", str(cfg), "--out", str(out), "--quiet")
    assert code == 0, text
    for p, mtime in kept.items():  # finished methods were reused, not recomputed
        assert p.stat().st_mtime_ns == mtime
    assert not list(out.rglob(".*.tmp*"))
    single = attribute(LIN, out=tmp_path / "single")
    for label, scores in single.scores.items():
        assert np.array_equal(np.load(out / label / "scores.npy"), scores.astype(np.float32))


def test_a_writer_sweeps_temporaries_left_by_a_killed_one(tmp_path: Path) -> None:
    (tmp_path / "out" / "m").mkdir(parents=True)
    stale = tmp_path / "out" / "m" / ".scores.npy.abc123.tmp.npy"
    stale.write_bytes(b"\x93NUMPY half")
    with directory_lock(tmp_path / "out"):
        assert not stale.exists()


def test_bench_holds_the_suite_shared_and_suite_build_exclusive(
    lin_suite: Path, tmp_path: Path
) -> None:
    proc = _holder(lin_suite, "s")  # a bench reading the suite
    try:
        cfg = write_config(tmp_path / "cfg.yaml", LIN)
        code, text = cli_run("suite", "build", str(cfg), "--out", str(lin_suite), "--quiet")
        assert code == 2 and f"suite '{lin_suite}' is in use by pid {proc.pid}" in text, text
    finally:
        proc.kill()
        proc.wait()
    proc = _holder(lin_suite, "x")  # a suite build
    try:
        data = {**LIN, "evaluation": {"suite": str(lin_suite)}}
        cfg = write_config(tmp_path / "bench.yaml", data)
        code, text = cli_run("bench", str(cfg), "--out", str(tmp_path / "b"), "--quiet")
        assert code == 2 and f"being written by pid {proc.pid}" in text, text
    finally:
        proc.kill()
        proc.wait()
