"""One writer per output directory: OS-level ``flock`` locks.

``attribute``, ``bench``, ``counterfactual`` and ``suite build`` hold an exclusive lock on their
output directory for the whole command; ``bench`` (and ``counterfactual`` on a suite) also holds
a *shared* lock on the suite it reads, which ``suite build`` takes exclusively. The lock is
``flock`` on the directory itself (no lock file is created, so a read-only suite can be locked
shared): the kernel releases it when the process dies, so a killed writer never leaves a stale
lock and the next run simply takes it and resumes. A second writer fails at once — before any
work — with :class:`LockedError` (exit 2) naming the directory and the holder's pid.

Locks are re-entrant within a process (``bench`` locks ``OUT`` and calls ``attribute`` on the
same ``OUT``): the same directory is locked once, counted, and released by the outermost holder.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from attribution_core.errors import AttributionError


class LockedError(AttributionError):
    """Another process holds the directory's lock (CLI exit 2)."""


_HELD: dict[tuple[int, int], tuple[int, bool, int]] = {}
"""``(st_dev, st_ino) -> (fd, exclusive, depth)`` of the locks this process holds."""


def holders(path: str | Path) -> list[int]:
    """Pids holding a ``flock`` on ``path`` (from ``/proc/locks``; empty where unavailable)."""
    try:
        st = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2f:5678 0 EOF" (or "-> FLOCK ..." for waiters)
        if "FLOCK" in fields and len(fields) >= 6:
            i = fields.index("FLOCK")
            if len(fields) > i + 4 and fields[i + 4] == inode and fields[i + 3].isdigit():
                pids.append(int(fields[i + 3]))
    return sorted(set(pids) - {os.getpid()})


@contextmanager
def directory_lock(
    path: str | Path, *, exclusive: bool = True, what: str = "output directory"
) -> Iterator[Path]:
    """Hold a ``flock`` on directory ``path`` (created if missing) for the ``with`` block.

    Args:
        path: the directory.
        exclusive: True for a writer; False for a reader (many readers, no writer).
        what: how the message names the directory (``"output directory"``, ``"suite"``).

    Raises:
        LockedError: another process holds a conflicting lock (nothing is waited for).
    """
    path = Path(path)
    created = exclusive and not path.exists()
    if exclusive:
        path.mkdir(parents=True, exist_ok=True)
    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    if key in _HELD:  # re-entrant: an exclusive hold covers a nested shared/exclusive one
        fd, held_exclusive, depth = _HELD[key]
        if exclusive and not held_exclusive:
            _acquire(fd, path, exclusive=True, what=what)
        _HELD[key] = (fd, held_exclusive or exclusive, depth + 1)
        try:
            yield path
        finally:
            _HELD[key] = (fd, held_exclusive or exclusive, depth)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _acquire(fd, path, exclusive=exclusive, what=what)
        _HELD[key] = (fd, exclusive, 1)
        if exclusive:
            sweep_temporaries(path)
        yield path
    except BaseException:
        if created:  # a command that failed before writing anything leaves no directory
            try:
                path.rmdir()
            except OSError:
                pass
        raise
    finally:
        _HELD.pop(key, None)
        os.close(fd)  # closing the last descriptor releases the flock


def sweep_temporaries(path: Path) -> int:
    """Remove the temporary files (``.<name>.*.tmp*``) a killed writer left under ``path``.

    Only called with the exclusive lock held, so no live writer owns them. Returns the count.
    """
    n = 0
    for tmp in path.rglob(".*.tmp*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def _acquire(fd: int, path: Path, *, exclusive: bool, what: str) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        pids = holders(path)
        who = f"pid {', '.join(map(str, pids))}" if pids else "another process"
        mode = "in use" if exclusive else "being written"
        raise LockedError(
            f"{what} {str(path)!r} is {mode} by {who}; wait for it to finish (or stop it), or "
            f"choose another --out — a killed run's lock is released by the kernel, so re-running "
            f"then resumes"
        ) from None


@contextmanager
def command_locks(out: str | Path | None, suite: str | Path | None = None) -> Iterator[None]:
    """A command's locks: ``out`` exclusively (if given), ``suite`` shared (if it exists)."""
    with ExitStack() as stack:
        if out is not None:
            stack.enter_context(directory_lock(out))
        if suite is not None and Path(suite).is_dir():
            stack.enter_context(directory_lock(suite, exclusive=False, what="suite"))
        yield
