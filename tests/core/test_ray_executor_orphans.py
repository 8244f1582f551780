"""No Ray process is left after a run that used a local Ray instance exits, fails or is killed
with SIGKILL (issue 20, acceptance 1), checked by process listing: the test polls the run's
process tree while it runs (every Ray process it started: gcs_server, raylet, the dashboard and
runtime-env agents, workers, the watchdog) and then lists those processes again."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from attribution_core.ray_watchdog import kill_tree

Key = tuple[int, float]

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from attribution_core.builtin.executors import RayExecutor

    def job(x):
        if x == "fail":
            raise RuntimeError("the job failed")
        time.sleep(x)
        return x

    items = {"sleep": [60.0, 60.0], "fail": ["fail"]}[sys.argv[1]]
    print(dict(RayExecutor(num_cpus=2).map(job, items)), flush=True)
    """
)


def _tree(proc: psutil.Process) -> dict[Key, str]:
    found = {}
    try:
        children = proc.children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            found[(child.pid, child.create_time())] = child.name()
        except psutil.Error:
            pass
    return found


def _run(cmd: list[str], log: Path, kill_when: str | None = None, limit: float = 120.0):
    """Run ``cmd``, recording its process tree every 0.1 s; SIGKILL it once a process named
    ``kill_when`` runs in it.  Returns ``(exit code, output, {key: name} of every process)``."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    seen: dict[Key, str] = {}
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline:
        seen.update(_tree(parent))
        if kill_when is not None and kill_when in seen.values():
            seen.update(_tree(parent))
            os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    return proc.wait(), log.read_text(), seen


def _running(seen: dict[Key, str]) -> list[tuple[int, str]]:
    left = []
    for (pid, ctime), name in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == ctime and p.status() != psutil.STATUS_ZOMBIE:
                left.append((pid, name))
        except psutil.NoSuchProcess:
            pass
    return left


def _assert_none_left(seen: dict[Key, str], within: float = 5.0, ray: bool = True) -> None:
    names = set(seen.values())
    assert not ray or {"raylet", "gcs_server"} <= names, f"no Ray instance was seen: {names}"
    deadline = time.monotonic() + within
    while _running(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(seen), f"left running: {_running(seen)}"


def _tree_of_sleepers() -> tuple[subprocess.Popen, Key]:
    """A stand-in for a Ray process: a shell with two sleeping children."""
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    time.sleep(0.3)
    return proc, (proc.pid, psutil.Process(proc.pid).create_time())


def test_kill_tree_checks_the_start_time_and_takes_descendants():
    proc, key = _tree_of_sleepers()
    seen = {key: "sh", **_tree(psutil.Process(proc.pid))}
    try:
        assert len(seen) == 3
        assert kill_tree([(key[0], key[1] - 100.0)]) == []  # same pid, other start: recycled
        assert proc.poll() is None and len(_running(seen)) == 3
        assert sorted(kill_tree([key])) == sorted(pid for pid, _ in seen)
        proc.wait()
        _assert_none_left(seen, ray=False)
    finally:
        kill_tree(seen)


def test_watchdog_kills_the_tree_when_the_driver_dies():
    driver = subprocess.Popen(["sleep", "60"])
    driver_key = (driver.pid, psutil.Process(driver.pid).create_time())
    proc, key = _tree_of_sleepers()
    seen = {key: "sh", **_tree(psutil.Process(proc.pid))}
    script = Path(kill_tree.__code__.co_filename)
    args = [f"{pid}:{ctime!r}" for pid, ctime in (driver_key, key)]
    cmd = [sys.executable, "-I", str(script), "--driver", *args]
    dog = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert dog.stdout.readline().strip() == "armed"
        time.sleep(0.5)
        assert len(_running(seen)) == 3  # the driver lives: nothing is touched
        driver.kill()
        driver.wait()
        assert dog.wait(timeout=10) == 0
        proc.wait()
        _assert_none_left(seen, within=1.0, ray=False)
    finally:
        kill_tree([*seen, driver_key])
        if dog.poll() is None:
            dog.kill()
        dog.wait()
        dog.stdout.close()


needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="the ray extra is not installed"
)


@needs_ray
def test_cli_run_leaves_no_ray_process(tmp_path):
    config = {
        "task": {"name": "linear-regression", "n_train": 64, "dim": 3},
        "queries": {"count": 2},
        "target": "mse",
        "methods": ["grad-dot"],
        "chunk_size": 16,
        "shards": 4,
        "executor": {"name": "ray", "num_cpus": 2},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "attribution_core.cli", "attribute", str(path)]
    code, out, seen = _run([*cli, "--out", str(tmp_path / "out"), "--quiet"], tmp_path / "log")
    assert code == 0, out
    assert (tmp_path / "out" / "grad-dot" / "scores.npy").is_file()
    _assert_none_left(seen)


@needs_ray
def test_failed_run_leaves_no_ray_process(tmp_path):
    (tmp_path / "run.py").write_text(SCRIPT)
    code, out, seen = _run([sys.executable, "run.py", "fail"], tmp_path / "log")
    assert code == 1 and "the job failed" in out, out
    _assert_none_left(seen)


@needs_ray
def test_killed_run_leaves_no_ray_process(tmp_path):
    (tmp_path / "run.py").write_text(SCRIPT)
    # SIGKILL once a job runs (Ray names a worker running a task after the task: ray::_apply)
    code, out, seen = _run([sys.executable, "run.py", "sleep"], tmp_path / "log", "ray::_apply")
    assert code == -signal.SIGKILL, out
    _assert_none_left(seen)
