"""Toy tasks for the K-FAC tests: tiny nets whose dense GGN is cheap (float64).

``ToyTask`` is a real :class:`Task` (no mocks): random data, an untrained model (curvature is
tested at any θ), ``loss = Σ_k (f_k(x) − y_k)²`` (MSE, summed over outputs) or cross-entropy,
``scale = 1/N`` — so ``scale · GGN(sum loss) = GGN of L_D``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from attribution_core import CurvatureProblem, Measurement, Task, row_chunks
from attribution_core.gradients import select_parameters
from attribution_core.interfaces import Batch, FitInputs, MethodParts


class SumSquaredError(Measurement):
    """``‖f(x) − y‖²`` summed over outputs: ``(B,)``."""

    name = "sum-squared-error"

    def evaluate(self, forward, batch: Batch, noise: Batch) -> Tensor:
        return ((forward(batch["x"]) - batch["y"]) ** 2).sum(-1)


class CrossEntropyLoss(Measurement):
    """``−log softmax(f(x))_y``: ``(B,)``."""

    name = "ce"

    def evaluate(self, forward, batch: Batch, noise: Batch) -> Tensor:
        return nn.functional.cross_entropy(forward(batch["x"]), batch["y"], reduction="none")


class ToyTask(Task):
    """A tiny supervised task around ``make_model`` (see module doc)."""

    name = "toy"

    def __init__(
        self,
        make_model: Callable[[], nn.Module],
        x: Tensor,
        loss: str = "mse",
        l2: float = 0.0,
        n_out: int = 3,
        batch: int = 7,
    ) -> None:
        self.dtype = x.dtype
        self.make_model = make_model
        self.loss = loss
        self.l2 = l2
        self.batch = batch
        gen = torch.Generator().manual_seed(1)
        n = x.shape[0]
        if loss == "mse":
            y = torch.randn(n, n_out, generator=gen, dtype=x.dtype)
        else:
            y = torch.randint(0, n_out, (n,), generator=gen)
        self._data = {"x": x, "y": y}

    def train_data(self) -> Batch:
        return self._data

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self.make_model().to(self.dtype).eval()

    def train(self, model: nn.Module, weights: Tensor, seed: int) -> nn.Module:
        return model.eval()

    def make_queries(self, model: nn.Module, n: int, seed: int) -> Batch:
        g = torch.Generator().manual_seed(100 + seed)
        x = self._data["x"]
        idx = torch.randperm(x.shape[0], generator=g)[:n]
        return {
            k: v[idx]
            + (
                0.1 * torch.randn(v[idx].shape, generator=g, dtype=v.dtype)
                if v.is_floating_point()
                else 0
            )
            for k, v in self._data.items()
        }

    def training_loss(self, n_samples: int | None = None) -> Measurement:
        return SumSquaredError() if self.loss == "mse" else CrossEntropyLoss()

    def curvature_problem(self, model: nn.Module, seed: int, n_samples: int) -> CurvatureProblem:
        x, y = self._data["x"], self._data["y"]
        n, b = x.shape[0], self.batch

        def batches(pass_index: int, rows: slice | None = None):
            return [(x[r], y[r]) for r in row_chunks(rows, n, b)]  # no noise: any pass

        return CurvatureProblem(
            model=model,
            loss_function=nn.MSELoss(reduction="sum")
            if self.loss == "mse"
            else nn.CrossEntropyLoss(reduction="sum"),
            batches=batches,
            scale=1.0 / n,
            n_rows=n,
        )

    def describe(self) -> dict:
        return {"name": self.name, "loss": self.loss, "l2": self.l2, "n": self._data["x"].shape[0]}


def inputs(n: int, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return torch.randn(
        n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def fit(hessian, task: ToyTask, seed: int = 0, model: nn.Module | None = None, cache_dir=None):
    """``(model, params, curvature)`` for ``hessian`` on ``task``."""
    model = model if model is not None else task.build_model(seed)
    params, _ = select_parameters(model)
    return model, params, hessian.fit(fit_inputs(task, model, params, seed, cache_dir))


def fit_inputs(task: Task, model: nn.Module, params, seed: int = 0, cache_dir=None) -> FitInputs:
    """The :class:`FitInputs` of a fit on ``task`` with its training loss (no gradient stream)."""
    return FitInputs(
        model=model,
        task=task,
        train_function=task.training_loss(),
        seed=seed,
        params=params,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )


def method_parts(hessian, compressor, train_fn: Measurement) -> MethodParts:
    """The built parts of an influence method (what the pipeline hands the scorer), seed 0."""
    return MethodParts(
        label="m",
        seed=0,
        train_function=train_fn,
        query_function=train_fn,
        hessian=hessian,
        compressor=compressor,
    )
