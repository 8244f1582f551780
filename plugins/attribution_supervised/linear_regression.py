"""Task ``linear-regression``: ridge regression trained in closed form (float64 by default).

Objective (paper eq. 4, the 1/N kept fixed when weights change)::

    L(θ) = (1/N) Σ_j w_j (y_j − θᵀx̃_j)² + λ‖θ‖²,   x̃ = [x, 1]  (θ = weight and bias)

Exact Hessian: ``H = (2/N) X̃ᵀX̃ + 2λI``.

``solver: gd`` replaces the closed form by ``steps`` steps of full-batch gradient descent from
``build_model(seed)``'s initialisation, ``θ ← θ − lr·∇L(θ)`` with
``∇L(θ) = (2/N) X̃ᵀ(w ⊙ (X̃θ − y)) + 2λθ`` (float64), which gives the task training checkpoints
(:meth:`LinearRegressionTask.checkpoints`, for TracIn) and the training-step hook
(single-model retraining, metagradients). ``optimizer: adam`` takes the same ``steps`` as Adam
steps (``torch.optim.Adam`` semantics) on the same full-batch objective.
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
    OptimizerConfig,
    OptimizerState,
    Params,
    StepBatch,
    Task,
    TrainingRecipe,
    optimizer_update,
    row_chunks,
    training_state_of,
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
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="solver: gd — plain gradient descent (sgd) or Adam steps."
    )


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
        optimizer: str = "sgd",
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
        self.optimizer = optimizer
        if solver != "closed-form" and optimizer != "sgd":  # sgd descriptions unchanged
            self.options.update(optimizer=optimizer)
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
        if self.optimizer != "sgd":
            yield from self._hook_steps(model, weights)
            return
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

    # ---- training-step hook (single-model retraining, metagradients) -------------------------
    def training_recipe(self) -> TrainingRecipe:
        """``steps`` full-batch steps (``B = N``) of GD or Adam at ``lr`` (``solver: gd`` only).

        Raises:
            ConfigError: ``solver: closed-form`` (no training run to replay).
        """
        if self.solver != "gd":
            raise ConfigError(
                "task.solver: 'closed-form' has no training run to replay step by step; set "
                "task.solver: gd (with task.steps, task.lr, task.optimizer) for single-model "
                "retraining and metagradients"
            )
        return TrainingRecipe(self.steps, self.n_train, OptimizerConfig(self.optimizer, self.lr))

    def draw_stream(self, seed: int, step: int) -> StepBatch:
        """Every example, every step: ``indices = 0..N-1`` (full batch, no noise, any seed)."""
        return StepBatch(torch.arange(self.n_train))

    def step_loss(self, params: Params, batch: StepBatch, weights: Tensor) -> Tensor:
        """``Σ_b w_{i_b} (y_{i_b} − θᵀx̃_{i_b})² / B + λ‖θ‖²`` (float64)."""
        Xt, y, theta = self._design(batch), self._data["y"].double(), _flat(params)
        r = Xt @ theta - y
        w = weights.to(Xt).reshape(-1)
        return (w * r * r).sum() / r.shape[0] + self.l2 * (theta * theta).sum()

    def train_step(
        self,
        params: Params,
        optimizer_state: OptimizerState,
        step: int,
        batch: StepBatch,
        weights: Tensor,
    ) -> tuple[dict[str, Tensor], OptimizerState]:
        """One step with the closed-form gradient ``(2/N) X̃ᵀ(w ⊙ (X̃θ − y)) + 2λθ`` (float64).

        The same operations as the SGD loop of :meth:`train`, so replaying the hook reproduces
        it bit for bit; the iterate is float64 whatever the task's dtype.
        """
        recipe = self.training_recipe()
        Xt, y, theta = self._design(batch), self._data["y"].double(), _flat(params)
        n = Xt.shape[0]
        w = weights.to(Xt).reshape(-1)
        grad = 2.0 * Xt.T @ (w * (Xt @ theta - y)) / n + 2.0 * self.l2 * theta
        if recipe.optimizer.kind == "sgd":
            return _split(theta - self.lr * grad), optimizer_state
        state = OptimizerState(  # float64 moments, like the iterate
            {k: v.double() for k, v in optimizer_state.exp_avg.items()},
            {k: v.double() for k, v in optimizer_state.exp_avg_sq.items()},
        )
        return optimizer_update(_split(theta), _split(grad), state, step, recipe)

    def _design(self, batch: StepBatch) -> Tensor:
        """``X̃ = [X, 1]`` (float64); the batch must be the full batch ``0..N-1``."""
        X = self._data["x"].double()
        n = X.shape[0]
        if batch.indices.shape != (n,):
            raise ValueError(f"batch mismatch: expected the full batch of {n} rows.")
        return torch.cat([X, torch.ones(n, 1, dtype=X.dtype, device=X.device)], dim=1)

    def _hook_steps(self, model: nn.Module, weights: Tensor) -> Iterator[int]:
        """:meth:`train_step` in place from ``model`` (float64 iterate); yield each step."""
        params, state = training_state_of(model, self.training_recipe())
        w = weights.detach()
        for step in range(1, self.steps + 1):
            params, state = self.train_step(params, state, step, self.draw_stream(0, step), w)
            with torch.no_grad():
                model.weight.copy_(params["weight"])
                model.bias.copy_(params["bias"])
            yield step

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
        x, y = self._data["x"], self._data["y"][:, None]
        n = x.shape[0]

        def batches(pass_index: int, rows: slice | None = None) -> list[tuple[Tensor, Tensor]]:
            return [(x[r], y[r]) for r in row_chunks(rows, n, 256)]  # no noise: any pass

        return CurvatureProblem(
            model=model,
            loss_function=nn.MSELoss(reduction="sum"),
            batches=batches,
            scale=1.0 / n,
            n_rows=n,
        )

    def describe(self) -> dict:
        """Name and options."""
        return {"name": self.name, **self.options}


def _flat(params: Params) -> Tensor:
    """``θ = [weight, bias]`` as one float64 vector ``(d + 1,)``."""
    return torch.cat([params["weight"].reshape(-1), params["bias"].reshape(-1)]).double()


def _split(theta: Tensor) -> dict[str, Tensor]:
    """Inverse of :func:`_flat`: ``{"weight": (1, d), "bias": (1,)}``."""
    return {"weight": theta[:-1].reshape(1, -1), "bias": theta[-1:]}
