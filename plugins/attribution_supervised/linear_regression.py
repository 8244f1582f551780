"""Task ``linear-regression``: ridge regression trained in closed form (float64 by default).

Objective (paper eq. 4, the 1/N kept fixed when weights change)::

    L(θ) = (1/N) Σ_j w_j (y_j − θᵀx̃_j)² + λ‖θ‖²,   x̃ = [x, 1]  (θ = weight and bias)

Exact Hessian: ``H = (2/N) X̃ᵀX̃ + 2λI``.

``solver: gd`` replaces the closed form by ``steps`` steps of full-batch gradient descent from
``build_model(seed)``'s initialisation, ``θ ← θ − lr·∇L(θ)`` with
``∇L(θ) = (2/N) X̃ᵀ(w ⊙ (X̃θ − y)) + 2λθ`` (float64), which gives the task training checkpoints
(:meth:`LinearRegressionTask.checkpoints`, for TracIn).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from attribution_core import (
    Batch,
    Checkpoint,
    ConfigError,
    CurvatureProblem,
    DataError,
    Measurement,
    Task,
)
from attribution_supervised.measurements import SquaredError
from attribution_supervised.replay import check_every, keep, snapshot


class LinearRegressionOptions(BaseModel):
    """Options of ``linear-regression``."""

    model_config = ConfigDict(extra="forbid")
    n_train: int = Field(200, ge=2, description="Synthetic training examples.")
    dim: int = Field(10, ge=1, description="Input dimension of synthetic data.")
    noise: float = Field(0.5, ge=0.0, description="Std of the synthetic label noise.")
    ridge: float = Field(1e-2, ge=0.0, description="λ of the λ‖θ‖² regulariser.")
    data_seed: int = Field(0, description="Seed of the synthetic data.")
    path: str | None = Field(
        None, description=".npz with X (N, d), y (N,) and optionally X_query, y_query."
    )
    solver: Literal["closed-form", "gd"] = Field(
        "closed-form", description="closed-form: exact ridge solution; gd: full-batch GD."
    )
    steps: int = Field(100, ge=1, description="Gradient-descent steps (solver: gd).")
    lr: float = Field(0.1, gt=0.0, description="Gradient-descent learning rate (solver: gd).")


class LinearRegressionTask(Task):
    """Ridge regression; ``train`` solves the weighted normal equations exactly."""

    name = "linear-regression"
    supervised_kind = "regression"

    def __init__(
        self,
        n_train: int = 200,
        dim: int = 10,
        noise: float = 0.5,
        ridge: float = 1e-2,
        data_seed: int = 0,
        path: str | None = None,
        solver: str = "closed-form",
        steps: int = 100,
        lr: float = 0.1,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        self.dtype = dtype
        self.device = torch.device(device)
        self.l2 = ridge
        self.options = {
            "n_train": n_train,
            "dim": dim,
            "noise": noise,
            "ridge": ridge,
            "data_seed": data_seed,
            "path": path,
        }
        if solver != "closed-form":  # closed-form descriptions (and cache keys) unchanged
            self.options.update(solver=solver, steps=steps, lr=lr)
        self.solver, self.steps, self.lr = solver, steps, lr
        self._query_pool: Batch | None = None
        if path is not None:
            X, y, self._query_pool = self._load(Path(path))
        else:
            gen = np.random.default_rng(data_seed)
            self._theta_true = gen.normal(size=dim)
            X = gen.normal(size=(n_train, dim))
            y = X @ self._theta_true + 0.3 + noise * gen.normal(size=n_train)
        self._data = self._batch(X, y)
        self._noise = noise

    def _batch(self, X: np.ndarray, y: np.ndarray) -> Batch:
        return {
            "x": torch.as_tensor(X, dtype=self.dtype, device=self.device),
            "y": torch.as_tensor(y, dtype=self.dtype, device=self.device),
        }

    def _load(self, path: Path) -> tuple[np.ndarray, np.ndarray, Batch | None]:
        if not path.is_file():
            raise DataError(f"task.path: {str(path)!r} does not exist; give an .npz with X and y")
        with np.load(path) as npz:
            missing = {"X", "y"} - set(npz.files)
            if missing:
                raise DataError(
                    f"task.path: {str(path)!r} lacks arrays {sorted(missing)}; has {npz.files}"
                )
            X, y = npz["X"], npz["y"]
            if X.ndim != 2 or y.shape != (X.shape[0],):
                raise DataError(
                    f"task.path: expected X (N, d) and y (N,), got X {X.shape}, y {y.shape}"
                )
            pool = None
            if "X_query" in npz.files and "y_query" in npz.files:
                pool = self._batch(npz["X_query"], npz["y_query"])
        return X, y, pool

    # ---- Task API --------------------------------------------------------------------------
    def train_data(self) -> Batch:
        """``{"x": (N, d), "y": (N,)}``."""
        return self._data

    def build_model(self, seed: int) -> nn.Module:
        """``nn.Linear(d, 1)`` initialised from ``seed``."""
        torch.manual_seed(seed)
        return nn.Linear(self._data["x"].shape[1], 1).to(self.device, self.dtype)

    def train(self, model: nn.Module, weights: Tensor, seed: int) -> nn.Module:
        """Closed form: ``((1/N) X̃ᵀWX̃ + λI) θ = (1/N) X̃ᵀWy`` (or ``steps`` GD steps)."""
        if self.solver == "gd":
            for _ in self._gd_steps(model, weights):
                pass
            return model.eval()
        X, y = self._data["x"].double(), self._data["y"].double()
        n = X.shape[0]
        Xt = torch.cat([X, torch.ones(n, 1, dtype=X.dtype, device=X.device)], dim=1)
        w = weights.to(X).reshape(-1)
        A = Xt.T @ (w[:, None] * Xt) / n + self.l2 * torch.eye(
            Xt.shape[1], dtype=X.dtype, device=X.device
        )
        theta = torch.linalg.solve(A, Xt.T @ (w * y) / n)
        with torch.no_grad():
            model.weight.copy_(theta[:-1].reshape(1, -1))
            model.bias.copy_(theta[-1:])
        return model.eval()

    def _gd_steps(self, model: nn.Module, weights: Tensor) -> Iterator[int]:
        """Full-batch GD in place (float64 iterate, copied into ``model``); yield each step."""
        X, y = self._data["x"].double(), self._data["y"].double()
        n = X.shape[0]
        Xt = torch.cat([X, torch.ones(n, 1, dtype=X.dtype, device=X.device)], dim=1)
        w = weights.to(X).reshape(-1)
        theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]).double()
        for step in range(1, self.steps + 1):
            grad = 2.0 * Xt.T @ (w * (Xt @ theta - y)) / n + 2.0 * self.l2 * theta
            theta = theta - self.lr * grad
            with torch.no_grad():
                model.weight.copy_(theta[:-1].reshape(1, -1))
                model.bias.copy_(theta[-1:])
            yield step

    def checkpoints(
        self, seed: int, every: int, *, optimizer_state: bool = False
    ) -> list[Checkpoint]:
        """GD states after steps ``every, 2·every, …, steps`` (``solver: gd`` only; no Adam).

        Raises:
            ConfigError: ``solver`` is ``closed-form`` (no training run to replay).
        """
        if self.solver != "gd":
            raise ConfigError(
                "task.solver: 'closed-form' has no training run to take checkpoints from; set "
                "task.solver: gd (with task.steps, task.lr) for methods that need checkpoints"
            )
        check_every(every)
        model = self.build_model(seed)
        ones = torch.ones(self.n_train, dtype=self.dtype)
        return [
            snapshot(step, model, self.lr)
            for step in self._gd_steps(model, ones)
            if keep(step, every, self.steps)
        ]

    def make_queries(self, model: nn.Module, n: int, seed: int) -> Batch:
        """Fresh draws from the synthetic distribution (or rows of X_query/y_query)."""
        if self._query_pool is not None:
            pool_n = self._query_pool["x"].shape[0]
            idx = torch.randperm(pool_n, generator=torch.Generator().manual_seed(seed))[:n]
            return {k: v[idx] for k, v in self._query_pool.items()}
        if self.options["path"] is not None:
            raise DataError("queries: the .npz has no X_query/y_query; use queries.source: train")
        gen = np.random.default_rng(10_000 + seed)
        X = gen.normal(size=(n, self._theta_true.shape[0]))
        y = X @ self._theta_true + 0.3 + self._noise * gen.normal(size=n)
        return self._batch(X, y)

    def training_loss(self, n_samples: int | None = None) -> Measurement:
        """``ℓ = (y − θᵀx̃)²``."""
        return SquaredError()

    def curvature_problem(self, model: nn.Module, seed: int, n_samples: int) -> CurvatureProblem:
        """``MSELoss(sum)`` on ``model(x)``, scale ``1/N`` (GGN = (2/N) X̃ᵀX̃)."""
        x, y = self._data["x"], self._data["y"]
        n = x.shape[0]
        return CurvatureProblem(
            model=model,
            loss_function=nn.MSELoss(reduction="sum"),
            batches=lambda pass_index: [
                (x[i : i + 256], y[i : i + 256, None]) for i in range(0, n, 256)
            ],
            scale=1.0 / n,
            n_rows=n,
        )

    def describe(self) -> dict:
        """Name and options."""
        return {"name": self.name, **self.options}
