"""The ``local`` executor: runs jobs one after another in this process."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from attribution_core.interfaces import Executor
from attribution_core.progress import progress_bar


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
