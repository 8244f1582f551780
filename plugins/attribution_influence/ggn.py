"""Matrix-free GGN products on (a minibatch of) the task's curvature problem, with torch.func.

The task's :class:`~attribution_core.CurvatureProblem` writes ``L_D`` as
``scale · Σ_rows loss(f(x_r), y_r)``, so the GGN of ``L_D`` is

    H = scale · Σ_r J_rᵀ (∇²_f loss_r) J_r,        J_r = ∂f(x_r)/∂θ : (k, p),

and the GGN of a uniformly drawn minibatch ``S`` of rows is its unbiased estimate

    H_S = (R/|S|) · scale · Σ_{r∈S} J_rᵀ (∇²_f loss_r) J_r,      R = number of rows.

``H V`` for ``V: (p, m)`` is one forward-mode product ``J V`` (``torch.func.jvp``), one
output-space Hessian product (``jvp`` of ``grad`` of the loss: ``2u`` for summed MSE,
``(diag(π) − ππᵀ)u`` for cross-entropy) and one reverse-mode product ``Jᵀ u`` (``vjp``),
vectorised over the ``m`` columns with ``vmap``: the cost of about ``m`` forward+backward passes
over the rows. We do this ourselves rather than through curvlinops' ``GGNLinearOperator``
because LiSSA needs the products on a fresh random subset of rows at every step, and a plugin
reaches its dependencies' internals from nowhere. The rows are those of the problem's pass 0
(the same Monte-Carlo ``(t, ε)`` draws ``dense_ggn`` and ``ggn-cg`` use), materialised once:
memory ``R ×`` (input + target size). The task's regulariser is *not* included: callers add
its Hessian ``2·l2·I`` to the damping, as ``ggn-cg`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor
from torch.func import functional_call, grad, jvp, vjp, vmap

from attribution_core import (
    ConfigError,
    CurvatureProblem,
    FitInputs,
    HessianApproximation,
    Task,
    validate_model,
)


def curvature_problem(model: Any, task: Task, seed: int, n_samples: int, who: str):
    """``task.curvature_problem(model, seed, n_samples)``; a ConfigError for tasks without one.

    Raises:
        ConfigError: the task does not expose a curvature problem.
    """
    try:
        return task.curvature_problem(model, seed, n_samples)
    except NotImplementedError:
        raise ConfigError(
            f"hessian {who}: task {task.name!r} does not expose a curvature problem "
            f"(loss(f(x), y)); use hessian dense or identity with this task"
        ) from None


def _concat(parts: list[Any]) -> Any:
    """Concatenate batch inputs (tensors, or dicts of tensors) along dim 0."""
    if isinstance(parts[0], Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _take(inputs: Any, index: Tensor | slice) -> Any:
    """Rows ``index`` of batch inputs (a tensor or a dict of tensors)."""
    if isinstance(inputs, Mapping):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


class GGNProducts:
    """``H_S V`` (module doc) for the included parameters, ``V: (p, m)``.

    Args:
        problem: the task's curvature problem (its model shares the task model's parameters).
        params: the included parameters, ``name -> tensor`` in the flat order of gradients.
        who: the Hessian's name, for messages.
        max_rows: rows per vectorised product (bounds memory: ``max_rows · m`` activations).

    Raises:
        ConfigError: a parameter of ``params`` is not a parameter of the problem's model.
    """

    def __init__(
        self,
        problem: CurvatureProblem,
        params: Mapping[str, Tensor],
        who: str,
        max_rows: int = 256,
    ) -> None:
        model = problem.model
        by_id = {id(v): k for k, v in model.named_parameters()}
        missing = [n for n, v in params.items() if id(v) not in by_id]
        if missing:
            raise ConfigError(
                f"hessian {who}: the curvature problem's model does not share parameters "
                f"{missing[:3]} with the task model; the task's curvature_problem must wrap, "
                f"not copy, the model"
            )
        self.names = [by_id[id(v)] for v in params.values()]
        self.shapes = [v.shape for v in params.values()]
        self.sizes = [v.numel() for v in params.values()]
        ids = {id(v) for v in params.values()}
        self.fixed = {k: v.detach() for k, v in model.named_parameters() if id(v) not in ids}
        self.fixed.update(dict(model.named_buffers()))
        self.theta = torch.cat([v.detach().reshape(-1) for v in params.values()])
        self.model, self.loss = model, problem.loss_function
        self.scale = float(problem.scale)
        batches = list(problem.batches(0))
        self.inputs = _concat([b[0] for b in batches])
        self.targets = torch.cat([b[1] for b in batches])
        self.n_rows = int(self.targets.shape[0])
        self.max_rows = max_rows
        self.products = 0.0  # full-data GGN-vector products so far (columns · rows/R)

    @property
    def n_params(self) -> int:
        """``p``."""
        return int(self.theta.numel())

    def _outputs(self, theta: Tensor, inputs: Any) -> Tensor:
        state = dict(self.fixed)
        for name, t, shape in zip(self.names, theta.split(self.sizes), self.shapes, strict=True):
            state[name] = t.reshape(shape)
        return functional_call(self.model, state, (inputs,))

    def _chunk(self, inputs: Any, targets: Tensor, V: Tensor) -> Tensor:
        """``Σ_{rows} J_rᵀ ∇²loss_r J_r V`` for one chunk of rows, ``V: (p, m)`` model dtype."""
        theta = self.theta

        def f(th: Tensor) -> Tensor:
            return self._outputs(th, inputs)

        out, pullback = vjp(f, theta)
        out = out.detach()

        def loss_grad(o: Tensor) -> Tensor:
            return grad(lambda z: self.loss(z, targets))(o)

        def column(v: Tensor) -> Tensor:
            Jv = jvp(f, (theta,), (v,))[1]
            HJv = jvp(loss_grad, (out,), (Jv,))[1]
            return pullback(HJv)[0]

        return vmap(column)(V.T).T

    def matmat(self, V: Tensor, rows: Tensor | None = None) -> Tensor:
        """``H V`` (``rows`` None: all R rows) or ``H_S V`` (``rows``: indices ``S``).

        Args:
            V: ``(p, m)`` any float dtype; products run in the model's dtype.
            rows: ``(|S|,)`` row indices, or None for the full GGN of ``L_D``.

        Returns:
            ``(p, m)`` float64: ``scale · (R/|S|) · Σ_{r∈S} J_rᵀ ∇²loss_r J_r V``.
        """
        dtype = self.theta.dtype
        Vm = V.to(dtype)
        index = torch.arange(self.n_rows) if rows is None else rows
        out = torch.zeros(V.shape, dtype=torch.float64, device=V.device)
        for a in range(0, index.numel(), self.max_rows):
            sel = index[a : a + self.max_rows].to(self.targets.device)
            out += self._chunk(_take(self.inputs, sel), self.targets[sel], Vm).double()
        self.products += V.shape[1] * index.numel() / self.n_rows
        return out * (self.scale * self.n_rows / index.numel())


class GGNHessian(HessianApproximation):
    """Base of the Hessians built on :class:`GGNProducts` (``lissa``, ``arnoldi``).

    Subclasses set ``options_model`` (a pydantic model with ``n_samples`` and ``max_rows``);
    the options are validated once, when the Hessian is built, and kept read-only.

    Raises:
        ConfigError: an option is unknown or out of range.
    """

    options_model: ClassVar[type[BaseModel]]

    def __init__(self, **options: Any) -> None:
        self.options = validate_model(self.options_model, options, where=f"hessian {self.name!r}")

    def describe(self) -> dict[str, Any]:
        """Name, space and every option (before fitting)."""
        return {**super().describe(), **self.options.model_dump()}

    def products(self, inputs: FitInputs) -> tuple[int, GGNProducts]:
        """``(n_samples, GGN-vector products)`` on pass 0 of the task's curvature problem."""
        opts = self.options
        n_samples = opts.n_samples or max(1, int(getattr(inputs.train_function, "n_samples", 1)))
        problem = curvature_problem(inputs.model, inputs.task, inputs.seed, n_samples, self.name)
        return n_samples, GGNProducts(problem, inputs.params, self.name, opts.max_rows)
