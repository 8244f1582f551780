"""The executors: ``local`` (sequential, in-process) and ``ray`` (Ray tasks), and
:func:`make_executor`, which builds the one a run config names.

Ray: ``executor: {name: ray, address: auto}`` connects to a running cluster
(``ray start --head`` on the head node, ``ray start --address=HEAD:6379`` on workers; every
node needs this package and its plugins installed in the same Python environment).  Without
``address`` a local Ray instance is started with ``num_cpus`` CPUs.  Each job runs as one Ray
task reserving ``cpus_per_task`` CPUs; the job itself pins torch's thread count, so results are
the same as with the ``local`` executor.  A bad ``address`` fails within 10 s with a
``ConfigError`` (:mod:`attribution_core.ray_address`); a job whose worker dies is retried
``max_retries`` times (:class:`RayJobError` after that); a local instance's processes are owned
by a watchdog and killed however the driver ends (:mod:`attribution_core.ray_watchdog`).

This module imports neither the registry nor the config at run time (``builtin`` registers
these classes, so importing the registry here would be a cycle); :func:`make_executor` takes
the registry as an argument.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from attribution_core.errors import JobFailedError
from attribution_core.interfaces import Executor
from attribution_core.progress import progress_bar

if TYPE_CHECKING:
    from attribution_core.config import RunConfig
    from attribution_core.registry import Registry


# ---- local -----------------------------------------------------------------------------------
class LocalOptions(BaseModel):
    """The local executor has no options."""

    model_config = ConfigDict(extra="forbid")


class LocalExecutor(Executor):
    """Sequential, in-process."""

    name = "local"
    tasks_submitted = 0  # Ray tasks: none here (the attribute every executor has)

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        desc: str = "",
        progress: bool = False,
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(i, fn(items[i]))`` in order."""
        with progress_bar(len(items), desc or "jobs", enabled=progress) as bar:
            for i, item in enumerate(items):
                result = fn(item)
                bar.advance()
                yield i, result


# ---- ray -------------------------------------------------------------------------------------
class RayOptions(BaseModel):
    """Options of the ``ray`` executor."""

    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(
        None,
        description="Cluster address ('auto', 'ray://host:10001', 'host:6379'); None = start locally.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started instance.")
    cpus_per_task: float = Field(1.0, gt=0.0, description="CPUs reserved per job.")
    max_retries: int = Field(
        2, ge=0, description="Retries of a job whose worker died (killed, out of memory)."
    )
    shutdown: bool = Field(False, description="Shut Ray down after each map (tests).")


class RayJobError(JobFailedError):
    """A Ray job failed for a system reason (its worker or node died) more often than
    ``max_retries`` allows; the run stops, and re-running it resumes from the finished work."""


class RayExecutor(Executor):
    """Runs each job as a Ray task; yields results as they finish.

    ``tasks_submitted`` counts the Ray tasks this executor submitted (retries of a task whose
    worker died are not counted again).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_task: float = 1.0,
        max_retries: int = 2,
        shutdown: bool = False,
    ) -> None:
        self.address, self.num_cpus = address, num_cpus
        self.cpus_per_task, self.max_retries, self.shutdown = cpus_per_task, max_retries, shutdown
        self._tasks_submitted = 0
        if address and address != "local":
            _check_address(address)  # a bad address fails now (within 10 s), not at first map

    @property
    def tasks_submitted(self) -> int:
        """Ray tasks submitted by this executor so far (one per job)."""
        return self._tasks_submitted

    def _init(self) -> Any:
        """Start or connect to Ray (once per process); returns the ``ray`` module."""
        import ray  # optional dependency: only the ray executor needs it

        if not ray.is_initialized():
            _start_ray(ray, self.address, self.num_cpus)
        return ray

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        desc: str = "",
        progress: bool = False,
    ) -> Iterator[tuple[int, Any]]:
        """Submit every item, then yield ``(index, result)`` in completion order.

        ``fn`` goes into the object store once (``ray.put``) and is shared by all tasks.  A task
        whose worker dies is retried up to ``max_retries`` times; then :class:`RayJobError`.
        An exception raised by ``fn`` itself is re-raised as is (it is not retried).
        """
        if not items:
            return
        ray = self._init()
        remote = ray.remote(num_cpus=self.cpus_per_task, max_retries=self.max_retries)(_apply)
        fn_ref = ray.put(fn)
        pending = {}
        for i, item in enumerate(items):
            pending[remote.remote(fn_ref, item)] = i
            self._tasks_submitted += 1
        try:
            with progress_bar(len(items), desc or "jobs", enabled=progress) as bar:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    for ref in done:
                        i = pending.pop(ref)
                        result = self._get(ray, ref, i, len(items), desc)
                        bar.advance()
                        yield i, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if self.shutdown:
                shutdown_ray()

    def _get(self, ray: Any, ref: Any, i: int, n: int, desc: str) -> Any:
        """``ray.get(ref)``; a system failure (worker or node died) becomes RayJobError."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError:
            raise  # fn raised: an instance of fn's exception type too; not retried
        except ray.exceptions.RayError as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise RayJobError(
                f"{desc or 'job'} {i + 1} of {n} failed on Ray {self.max_retries + 1} times "
                f"({type(exc).__name__}: {first}); the run stopped: re-run the same command to "
                "resume from the finished work (executor.max_retries sets how often a job is "
                "retried)"
            ) from exc


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    """The Ray task: ``fn(item)`` (``fn`` may be any picklable callable, builtins included)."""
    return fn(item)


_GUARD: Any = None  # the RayProcessGuard of the local instance this process started, if any


def _start_ray(ray: Any, address: str | None, num_cpus: int | None) -> None:
    """``ray.init``: connect to ``address`` (checked first: a bad one fails within 10 s with a
    ConfigError) or start a local instance, whose processes a watchdog then owns (none is left
    running however this process ends, SIGKILL included)."""
    global _GUARD
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address and address != "local":
        _check_address(address)
        ray.init(address=address, **kwargs)
        return
    from attribution_core import ray_watchdog

    if _GUARD is not None:  # a previous instance, shut down without shutdown_ray()
        _GUARD.stop()
        _GUARD = None
    before = ray_watchdog.current_children()
    # "local": a new instance even if RAY_ADDRESS or `ray start` names a cluster
    # workers inherit these: one BLAS/OpenMP thread unless the job sets more
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env}, **kwargs)
    _GUARD = ray_watchdog.RayProcessGuard(ray_watchdog.started_processes(ray, before))
    _GUARD.start()
    atexit.unregister(shutdown_ray)
    atexit.register(shutdown_ray)  # after ray.init's own atexit hook, so it runs first


def _check_address(address: str) -> None:
    """ConfigError within 10 s unless a Ray cluster answers at ``address`` (checked once per
    address and process; not while this process is connected to Ray already)."""
    ray = sys.modules.get("ray")
    if address in _CHECKED or (ray is not None and ray.is_initialized()):
        return
    from attribution_core.ray_address import check_ray_address

    check_ray_address(address)
    _CHECKED.add(address)


_CHECKED: set[str] = set()


def shutdown_ray() -> None:
    """``ray.shutdown()``, then kill whatever the local instance this process started left
    behind, and retire its watchdog.  Registered with ``atexit``; safe to call twice."""
    global _GUARD
    import ray

    if ray.is_initialized():
        ray.shutdown()
    guard, _GUARD = _GUARD, None
    if guard is not None:
        guard.stop()


# ---- construction ----------------------------------------------------------------------------
def make_executor(config: RunConfig, registry: Registry) -> Executor:
    """The executor named by ``config.executor`` (options validated by its registered model)."""
    ex = config.executor
    return registry.create("executor", ex.name, where="executor", **ex.options)
