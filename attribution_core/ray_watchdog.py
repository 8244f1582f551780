"""No orphaned Ray processes: the watchdog that kills exactly the processes a local Ray
instance of this driver started, when the driver ends in any way (SIGKILL included).

Holds :class:`RayProcessGuard` (used by the ``ray`` executor right after ``ray.init`` starts a
*local* instance; never for a cluster it only connects to), :func:`started_processes` (the
processes ``ray.init`` started: the one place that reads Ray's private node record, with a
process-tree fallback), :func:`kill_tree` (freeze, collect descendants, SIGKILL — a process
counts only if its pid *and* create time match, so a recycled pid is never killed) and the
watchdog itself (:func:`watch`, :func:`main`).

Why: after ``kill -9`` of a driver, Ray's ``raylet``, ``gcs_server``, ``ray::DashboardAgent``
and ``ray::RuntimeEnvAgent`` stay alive with parent 1 and ignore SIGTERM.  The watchdog runs
in its own session (a signal to the driver's process group does not reach it), polls the
driver, keeps a snapshot of the Ray process tree while the driver lives (so workers whose
raylet dies first are still known) and, once the driver is gone, SIGKILLs the snapshot and
exits.  It is started by file path (``python -I .../ray_watchdog.py``) so it imports only the
standard library and ``psutil``, not this package (torch).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
from typing import Any

import psutil

Key = tuple[int, float]  # (pid, create_time): one process, never a recycled pid

POLL_S = 0.25  # how often the watchdog checks the driver
REFRESH_S = 1.0  # how often it refreshes its snapshot of the Ray process tree
READY_TIMEOUT_S = 15.0  # how long the driver waits for the watchdog to report that it is armed
SAME_START_S = 0.01  # start times this close name the same process (a recycled pid: later)


# ---- processes -------------------------------------------------------------------------------
def key_of(proc: psutil.Process) -> Key | None:
    """``(pid, create_time)`` of a live process; None if it is gone."""
    try:
        return proc.pid, proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def alive(key: Key) -> psutil.Process | None:
    """The process ``key`` names if it still runs (same pid *and* create time), else None."""
    try:
        proc = psutil.Process(key[0])
        if abs(proc.create_time() - key[1]) > SAME_START_S:
            return None  # the pid was recycled: another process
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def descendants(keys: Iterable[Key]) -> set[Key]:
    """``keys`` that still run, and every live descendant of them."""
    found: set[Key] = set()
    for key in keys:
        proc = alive(key)
        if proc is None:
            continue
        found.add(key)
        try:
            children = proc.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found.update(k for k in map(key_of, children) if k is not None)
    return found


def kill_tree(keys: Iterable[Key], *, exclude: Iterable[int] = ()) -> list[int]:
    """SIGKILL the processes ``keys`` names and all their live descendants; returns the pids
    killed (none if all are gone already).

    The processes are first stopped (SIGSTOP: a stopped raylet cannot start a new worker
    between the listing and the kill), then listed again with their descendants and killed.
    ``exclude`` (pids) are never touched: the driver, the watchdog.
    """
    skip = set(exclude) | {os.getpid()}
    targets: set[Key] = set(keys)
    killed: list[int] = []
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        targets |= descendants(targets)
        for key in sorted(targets):
            proc = alive(key)
            if proc is None or key[0] in skip:
                continue
            try:
                proc.send_signal(sig)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if sig == signal.SIGKILL:
                killed.append(key[0])
    _reap(killed)
    return killed


def _reap(pids: list[int], timeout: float = 3.0) -> None:
    """Wait (bounded) until ``pids`` are gone or zombies (dead; their parent or init reaps
    them), reaping those that are our own children."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [pid for pid in left if _running(pid)]
        if left:
            time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not); reaps it if it is our child."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def started_processes(ray: Any, before: set[Key]) -> set[Key]:
    """The processes ``ray.init`` just started in this driver: Ray's record of its node
    processes (private: ``ray._private.worker._global_node.all_processes``) and, as the
    fallback and complement, the driver's descendants that did not exist before ``init``."""
    found: set[Key] = set()
    try:
        node = ray._private.worker._global_node
        for infos in node.all_processes.values():
            for info in infos:
                key = key_of(psutil.Process(info.process.pid))
                if key is not None:
                    found.add(key)
    except Exception:
        pass
    tree = {k for k in map(key_of, psutil.Process().children(recursive=True)) if k is not None}
    return found | (tree - before)


def current_children() -> set[Key]:
    """This process's live descendants (taken before ``ray.init`` to tell Ray's apart)."""
    return {k for k in map(key_of, psutil.Process().children(recursive=True)) if k is not None}


# ---- the guard (driver side) -----------------------------------------------------------------
class RayProcessGuard:
    """Owns the Ray processes one local instance started: :meth:`start` arms the watchdog,
    :meth:`stop` (after ``ray.shutdown()``) kills what is left and retires the watchdog."""

    def __init__(self, keys: set[Key]) -> None:
        self.keys = set(keys)
        self.watchdog: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the watchdog in its own session and wait until it reports that it is armed."""
        me = psutil.Process()
        args = [f"{pid}:{ctime!r}" for pid, ctime in sorted(self.keys)]
        cmd = [sys.executable, "-I", os.path.abspath(__file__)]
        cmd += ["--driver", f"{me.pid}:{me.create_time()!r}", *args]
        self.watchdog = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        assert self.watchdog.stdout is not None
        ready, _, _ = select.select([self.watchdog.stdout], [], [], READY_TIMEOUT_S)
        line = self.watchdog.stdout.readline() if ready else b""
        self.watchdog.stdout.close()
        if line.strip() != b"armed":
            warnings.warn(
                "the Ray process watchdog did not start; if this process is killed, its Ray "
                f"processes (pids {sorted(pid for pid, _ in self.keys)}) may be left running",
                RuntimeWarning,
                stacklevel=2,
            )

    def stop(self) -> list[int]:
        """Kill the recorded Ray processes still alive and their descendants; stop the watchdog.
        Returns the pids that were still alive."""
        dog = self.watchdog
        self.watchdog = None
        killed = kill_tree(self.keys, exclude=[dog.pid] if dog else [])
        if dog is not None and dog.poll() is None:
            dog.kill()
        if dog is not None:
            dog.wait()
        return killed


# ---- the watchdog (its own process) ----------------------------------------------------------
def watch(
    driver: Key, keys: set[Key], *, poll: float = POLL_S, refresh: float = REFRESH_S
) -> list[int]:
    """Wait until the driver is gone, keeping a snapshot of the Ray process tree; then kill it."""
    known = descendants(keys) | keys
    last = time.monotonic()
    while alive(driver) is not None:
        time.sleep(poll)
        if time.monotonic() - last >= refresh:
            known |= descendants(known)
            last = time.monotonic()
    return kill_tree(known, exclude=[driver[0]])


def _parse_key(text: str) -> Key:
    pid, ctime = text.split(":", 1)
    return int(pid), float(ctime)


def main(argv: list[str] | None = None) -> int:
    """``ray_watchdog.py --driver PID:CTIME PID:CTIME...``: watch, then kill; prints ``armed``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver", type=_parse_key, required=True)
    parser.add_argument("keys", type=_parse_key, nargs="*")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C of the driver's terminal
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the driver's terminal closing
    print("armed", flush=True)
    try:
        sys.stdout.close()
    except OSError:
        pass
    watch(args.driver, set(args.keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
