"""The executors: ``local`` (sequential, in-process) and ``ray`` (Ray tasks), and
:func:`make_executor`, which builds the one a run config names.

Ray: ``executor: {name: ray, address: auto}`` connects to a running cluster
(``ray start --head`` on the head node, ``ray start --address=HEAD:6379`` on workers; every
node needs this package and its plugins installed in the same Python environment).  Without
``address`` a local Ray instance is started with ``num_cpus`` CPUs.  Each job runs as one Ray
task reserving ``cpus_per_task`` CPUs; the job itself pins torch's thread count, so results are
the same as with the ``local`` executor.

This module imports neither the registry nor the config at run time (``builtin`` registers
these classes, so importing the registry here would be a cycle); :func:`make_executor` takes
the registry as an argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

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
    shutdown: bool = Field(False, description="Shut Ray down after each map (tests).")


class RayExecutor(Executor):
    """Runs each job as a Ray task; yields results as they finish."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_task: float = 1.0,
        shutdown: bool = False,
    ) -> None:
        self.address, self.num_cpus = address, num_cpus
        self.cpus_per_task, self.shutdown = cpus_per_task, shutdown

    def _init(self) -> Any:
        """Start or connect to Ray (once per process); returns the ``ray`` module."""
        import ray  # optional dependency: only the ray executor needs it

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address:
                kwargs["address"] = self.address
            else:
                kwargs["num_cpus"] = self.num_cpus
                # workers inherit these: one BLAS/OpenMP thread unless the job sets more
                kwargs["runtime_env"] = {
                    "env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
                }
            ray.init(**kwargs)
        return ray

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        desc: str = "",
        progress: bool = False,
    ) -> Iterator[tuple[int, Any]]:
        """Submit every item, then yield ``(index, result)`` in completion order."""
        if not items:
            return
        ray = self._init()
        remote = ray.remote(num_cpus=self.cpus_per_task, max_retries=0)(_apply)
        fn_ref = ray.put(fn)
        pending = {remote.remote(fn_ref, item): i for i, item in enumerate(items)}
        try:
            with progress_bar(len(items), desc or "jobs", enabled=progress) as bar:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    for ref in done:
                        i = pending.pop(ref)
                        result = ray.get(ref)
                        bar.advance()
                        yield i, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if self.shutdown:
                ray.shutdown()


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    """The Ray task: ``fn(item)`` (``fn`` may be any picklable callable, builtins included)."""
    return fn(item)


# ---- construction ----------------------------------------------------------------------------
def make_executor(config: RunConfig, registry: Registry) -> Executor:
    """The executor named by ``config.executor`` (options validated by its registered model)."""
    ex = config.executor
    return registry.create("executor", ex.name, where="executor", **ex.options)
