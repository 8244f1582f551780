"""The ``ray`` executor on one local instance (2 CPUs, shared by this module): a worker killed
mid-task is survived (bounded retries, then a clear error), ``fn``'s own errors pass through,
results keep their indices, ``tasks_submitted`` counts, a live cluster passes the address
check, and ``shutdown_ray`` leaves none of the instance's processes running (issue 20)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from attribution_core.builtin import executors
from attribution_core.builtin.executors import RayExecutor, RayJobError
from attribution_core.ray_address import check_ray_address

ray = pytest.importorskip("ray")
# the jobs below travel by value: Ray's workers need not import this test module
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def die_once(item: tuple[str, int]) -> int:
    """SIGKILL the own worker on the first attempt (marker file), then square."""
    marker, x = Path(item[0]), item[1]
    if not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def always_die(x: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def raise_value_error(x: int) -> int:
    raise ValueError(f"bad item {x}")


@pytest.fixture(scope="module")
def ex():
    executor = RayExecutor(num_cpus=2)
    assert dict(executor.map(abs, [-1])) == {0: 1}  # starts the instance (and its watchdog)
    guard = executors._GUARD
    assert guard is not None and guard.keys, "the local instance's processes were not recorded"
    yield executor
    keys = set(guard.keys)
    executors.shutdown_ray()
    assert not ray.is_initialized()
    left = [pid for pid, ctime in keys if _running(pid, ctime)]
    assert not left, f"Ray processes left after shutdown_ray: {left}"


def _running(pid: int, ctime: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == ctime and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_killed_worker_is_retried(ex, tmp_path):
    items = [(str(tmp_path / f"marker-{x}"), x) for x in range(4)]
    before = ex.tasks_submitted
    got = dict(ex.map(die_once, items))
    assert got == {x: x * x for x in range(4)}
    assert all(Path(marker).exists() for marker, _ in items)  # every first attempt died
    assert ex.tasks_submitted - before == 4  # retries are Ray's, not new submissions


def test_a_job_that_keeps_dying_stops_the_run(ex):
    bounded = RayExecutor(num_cpus=2, max_retries=1)
    with pytest.raises(RayJobError) as err:
        dict(bounded.map(always_die, [7], desc="shard"))
    message = str(err.value)
    assert "shard 1 of 1 failed on Ray 2 times" in message
    assert "re-run the same command to resume" in message and "max_retries" in message
    assert err.value.exit_code == 1  # a dead worker is not bad input: CLI exit 1, one line


def test_errors_of_fn_pass_through_unretried(ex):
    with pytest.raises(ValueError, match="bad item 3"):
        dict(ex.map(raise_value_error, [3]))


def test_results_keep_their_indices_and_are_counted(ex):
    before = ex.tasks_submitted
    got = list(ex.map(abs, [-5, 6, -7]))
    assert sorted(got) == [(0, 5), (1, 6), (2, 7)]
    assert ex.tasks_submitted - before == 3 and ex.name == "ray"
    assert executors.LocalExecutor().tasks_submitted == 0


def test_live_cluster_passes_the_address_check(ex):
    gcs = ray._private.worker._global_node.gcs_address
    check_ray_address(gcs)  # no error: a Ray GCS answers there
