"""Bring your own model: wrap any ``nn.Module`` + dataset + loss into a :class:`Task`.

    task = ModuleTask(
        model_fn=lambda seed: MyNet(),               # a fresh (seeded) model
        train_data={"x": X, "y": y},                  # tensors with a shared leading dim N
        loss="cross-entropy",                         # or "mse", or a callable (outputs, y) -> (B,)
        queries={"x": X_test[:8], "y": y_test[:8]},
    )
    result = attribute({"methods": ["kfac-influence", "grad-dot"]}, task=task)

Training (used when the task must train or retrain: the base model, exact retraining, LDS
suites) is Adam on ``(1/N) Σ_j w_j ℓ_j + l2‖θ‖²`` over uniform minibatches, or your own
``train_fn(model, data, weights, seed) -> model``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from attribution_core.errors import ConfigError
from attribution_core.interfaces import (
    Batch,
    CurvatureProblem,
    Forward,
    Measurement,
    Task,
)
from attribution_core.interfaces import batch_size as leading_dim
from attribution_core.per_example import row_chunks

LossFn = Callable[[Tensor, Tensor], Tensor]
_LOSSES: dict[str, tuple[LossFn, type[nn.Module]]] = {
    "mse": (
        lambda out, y: ((out.reshape(out.shape[0], -1) - y.reshape(out.shape[0], -1)) ** 2).sum(1),
        nn.MSELoss,
    ),
    "cross-entropy": (
        lambda out, y: nn.functional.cross_entropy(out, y.long(), reduction="none"),
        nn.CrossEntropyLoss,
    ),
}


class LossMeasurement(Measurement):
    """``ℓ(θ, x) = loss(model(x[input_key]), x[target_key])``: ``(B,)``."""

    name = "loss"

    def __init__(self, loss: LossFn, input_key: str, target_key: str) -> None:
        self.loss, self.input_key, self.target_key = loss, input_key, target_key

    def evaluate(self, forward: Forward, batch: Batch, noise: Batch) -> Tensor:
        """Per-example loss."""
        return self.loss(forward(batch[self.input_key]), batch[self.target_key])


class ModuleTask(Task):
    """A :class:`Task` around user objects (see the module docstring)."""

    name = "module"

    def __init__(
        self,
        model_fn: Callable[[int], nn.Module],
        train_data: Batch,
        loss: str | LossFn = "cross-entropy",
        *,
        queries: Batch | None = None,
        model: nn.Module | None = None,
        train_fn: Callable[[nn.Module, Batch, Tensor, int], nn.Module] | None = None,
        input_key: str = "x",
        target_key: str = "y",
        steps: int = 500,
        lr: float = 1e-3,
        batch_size: int = 64,
        l2: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if isinstance(loss, str) and loss not in _LOSSES:
            raise ConfigError(
                f"loss {loss!r} is not built in; valid: {', '.join(_LOSSES)}, or pass a callable "
                f"(outputs, targets) -> (B,)"
            )
        for key in (input_key, target_key):
            if key not in train_data:
                raise ConfigError(f"train_data lacks {key!r}; has {sorted(train_data)}")
        self.device = torch.device(device)
        self.dtype = dtype or train_data[input_key].dtype
        self._data = {k: v.to(self.device) for k, v in train_data.items()}
        self._n = leading_dim(self._data)
        self._queries = queries
        self._model = model
        self.model_fn, self.train_fn = model_fn, train_fn
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        self.loss_fn = _LOSSES[loss][0] if isinstance(loss, str) else loss
        self.input_key, self.target_key = input_key, target_key
        self.steps, self.lr, self.bs, self.l2 = steps, lr, batch_size, l2

    def train_data(self) -> Batch:
        """The wrapped training data."""
        return self._data

    def build_model(self, seed: int) -> nn.Module:
        """``model_fn(seed)`` (the global torch seed is set to ``seed`` first)."""
        torch.manual_seed(seed)
        return self.model_fn(seed).to(self.device)

    def base_model(self, seed: int) -> nn.Module:
        """The ``model`` passed in (already trained), else train from ``seed``."""
        if self._model is not None:
            return self._model.to(self.device).eval()
        return super().base_model(seed)

    def train(self, model: nn.Module, weights: Tensor, seed: int) -> nn.Module:
        """``train_fn`` if given, else Adam on the weighted objective for ``steps`` steps."""
        if self.train_fn is not None:
            return self.train_fn(model, self._data, weights, seed).eval()
        gen = torch.Generator().manual_seed(seed)
        w = weights.to(self.device, self.dtype)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        model.train()
        for _ in range(self.steps):
            idx = torch.randint(self._n, (min(self.bs, self._n),), generator=gen).to(self.device)
            out = model(self._data[self.input_key][idx])
            per = self.loss_fn(out, self._data[self.target_key][idx])
            loss = (w[idx] * per).mean() + self.regularizer(dict(model.named_parameters()))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()

    def make_queries(self, model: nn.Module, n: int, seed: int) -> Batch:
        """The first ``n`` of the ``queries`` passed in."""
        if self._queries is None:
            raise ConfigError(
                "queries: ModuleTask has no queries; pass queries={...} or use queries.source: train"
            )
        return {k: v[:n].to(self.device) for k, v in self._queries.items()}

    def training_loss(self, n_samples: int | None = None) -> Measurement:
        """The wrapped loss."""
        return LossMeasurement(self.loss_fn, self.input_key, self.target_key)

    def curvature_problem(self, model: nn.Module, seed: int, n_samples: int) -> CurvatureProblem:
        """Built-in losses only: ``loss(reduction="sum")`` on ``model(x)``, scale ``1/N``."""
        if self.loss_name not in _LOSSES:
            raise ConfigError(
                f"K-FAC/GGN need a built-in loss ({', '.join(_LOSSES)}); got a custom callable "
                f"{self.loss_name!r}: use a gradient-only method (grad-dot, trak) or a built-in loss"
            )
        x, y, n = self._data[self.input_key], self._data[self.target_key], self._n
        if self.loss_name == "mse":
            y = y.reshape(n, -1)

        def batches(pass_index: int, rows: slice | None = None) -> list[tuple[Tensor, Tensor]]:
            return [(x[r], y[r]) for r in row_chunks(rows, n, 256)]  # no noise: any pass

        return CurvatureProblem(
            model=model,
            loss_function=_LOSSES[self.loss_name][1](reduction="sum"),
            batches=batches,
            scale=1.0 / n,
            n_rows=n,
        )

    def images(self, batch: Batch) -> Tensor | None:
        """4-D float inputs are treated as images (rescaled to [0, 1] per batch)."""
        x = batch[self.input_key]
        if x.ndim != 4 or not x.is_floating_point():
            return None
        lo, hi = x.amin(), x.amax()
        return (x - lo) / (hi - lo).clamp_min(1e-12)

    def describe(self) -> dict[str, Any]:
        """Name, size and training settings."""
        return {
            "name": self.name,
            "n_train": self._n,
            "loss": self.loss_name,
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.bs,
            "l2": self.l2,
        }
