"""Shared set-up of every fit: the task's curvature problem, its parameters, one data pass."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from attribution_core import ConfigError, CurvatureProblem, Measurement, Task
from attribution_kfac.curvature import Block

log = logging.getLogger("attribution_kfac")

SUPPORTED = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class DataPass:
    """One data pass over a curvature problem (or one data shard of it): re-iterable batches.

    A fit builds one object per pass — ``pass_index`` 0 for the Kronecker factors (and GGN-CG's
    products), 1 for EK-FAC's eigenvalue correction — so each pass draws its own seeded
    Monte-Carlo noise (the task seeds it per example by ``(seed, pass_index, i)``) and nothing is
    reassigned between passes. Every ``iter()`` of one object yields the same batches and noise
    (curvlinops operators are then built with ``check_deterministic=False``).

    Attributes:
        batches: ``CurvatureProblem.batches``: ``(pass_index, rows) -> iterable of (inputs,
            targets)``.
        pass_index: the pass index.
        rows: the training examples of this shard (None: the whole pass).
        per_example: loss rows per training example (``CurvatureProblem.per_example``).
    """

    batches: Callable[..., Iterable[tuple[Any, Tensor]]]
    pass_index: int = 0
    rows: slice | None = None
    per_example: int = 1

    @classmethod
    def of(cls, problem: CurvatureProblem, pass_index: int, rows: slice | None = None) -> DataPass:
        """Pass ``pass_index`` of ``problem`` (restricted to training examples ``rows``)."""
        return cls(problem.batches, pass_index, rows, problem.per_example)

    @property
    def first_row(self) -> int:
        """The absolute index of the first loss row this pass yields (per-row seeds count on)."""
        return 0 if self.rows is None else (self.rows.start or 0) * self.per_example

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        if self.rows is None:
            return iter(self.batches(self.pass_index))
        return iter(self.batches(self.pass_index, self.rows))


def row_restrictable(problem: CurvatureProblem) -> bool:
    """Whether ``problem.batches`` takes ``(pass_index, rows)`` (a task written before data
    shards takes ``pass_index`` only, and is run as one local pass)."""
    try:
        inspect.signature(problem.batches).bind(0, slice(0, 0))
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): assume the documented one
        return True
    return True


def fit_samples(n_samples: int | None, train_function: Measurement) -> int:
    """Monte-Carlo draws per training example in a fit: the option, else the train_function's."""
    return n_samples or max(1, int(getattr(train_function, "n_samples", 1)))


def get_problem(
    model: nn.Module, task: Task, seed: int, n_samples: int, who: str
) -> CurvatureProblem:
    """``task.curvature_problem`` with a ConfigError for tasks that have none."""
    try:
        return task.curvature_problem(model, seed, n_samples)
    except NotImplementedError:
        raise ConfigError(
            f"hessian {who}: task {task.name!r} does not expose a curvature problem "
            f"(loss(f(x), y)); use hessian dense or identity with this task"
        ) from None


def check_params(params: Mapping[str, Tensor], who: str) -> None:
    """Refuse an empty parameter set (no Linear/Conv2d layers)."""
    if not params:
        raise ConfigError(
            f"hessian {who}: the model has no Linear/Conv2d parameters; K-FAC, EK-FAC and "
            f"ggn-cg model only nn.Linear and nn.Conv2d layers — use hessian dense or identity"
        )


def problem_parameters(
    problem: CurvatureProblem, params: Mapping[str, Tensor], who: str
) -> tuple[list[Tensor], list[str]]:
    """The problem model's parameter objects in ``params`` order, and the excluded names.

    Parameters are matched by ``id()`` (the problem model shares them with the task model).
    Trainable parameters of the problem model outside ``params`` are excluded from the
    curvature (held fixed) and logged, never silently dropped.

    Raises:
        ConfigError: a parameter in ``params`` is not shared with the problem model.
    """
    by_id = {id(p): n for n, p in problem.model.named_parameters()}
    missing = [n for n, p in params.items() if id(p) not in by_id]
    if missing:
        raise ConfigError(
            f"hessian {who}: the curvature problem's model does not share parameters "
            f"{missing[:3]} with the task model; the task's curvature_problem must wrap, "
            f"not copy, the model"
        )
    ids = {id(p) for p in params.values()}
    excluded = [
        n for n, p in problem.model.named_parameters() if p.requires_grad and id(p) not in ids
    ]
    if excluded:
        log.info(
            "hessian %s: %d parameters excluded (held fixed): %s", who, len(excluded), excluded
        )
    return list(params.values()), excluded


def layer_blocks(
    problem: CurvatureProblem, params: Mapping[str, Tensor], joint: bool, who: str
) -> list[Block]:
    """One :class:`Block` per Linear/Conv2d module of the problem model holding included params.

    ``joint`` requests ``[W | b]`` blocks (``separate_weight_and_bias=False``); layers with only
    one of weight/bias included are always separate.

    Raises:
        ConfigError: an included parameter lives outside Linear/Conv2d modules.
    """
    offsets: dict[int, int] = {}
    names: dict[int, str] = {}
    off = 0
    for name, p in params.items():
        offsets[id(p)], names[id(p)] = off, name
        off += p.numel()
    blocks: list[Block] = []
    seen: set[int] = set()
    for mod_name, mod in problem.model.named_modules():
        if not isinstance(mod, SUPPORTED):
            continue
        w = mod.weight if id(mod.weight) in offsets else None
        b = mod.bias if mod.bias is not None and id(mod.bias) in offsets else None
        if w is None and b is None:
            continue
        weight = (offsets[id(w)], w.shape[0], w[0].numel()) if w is not None else None
        bias = (offsets[id(b)], b.shape[0]) if b is not None else None
        label = names[id(w if w is not None else b)].rsplit(".", 1)[0]
        blocks.append(
            Block(mod_name, label, weight, bias, joint and w is not None and b is not None)
        )
        seen.update(id(t) for t in (w, b) if t is not None)
    outside = [names[i] for i in offsets if i not in seen]
    if outside:
        raise ConfigError(
            f"hessian {who}: parameters {outside[:3]} are not in nn.Linear/nn.Conv2d modules "
            f"of the curvature model; only those layers are supported"
        )
    return blocks
