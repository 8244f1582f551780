"""Task ``digits-classifier``: a small MLP on scikit-learn's bundled 8×8 digits (no download).

Objective: ``(1/N) Σ_j w_j CE(f(x_j), y_j)`` with the 1/N fixed, minimised by Adam on uniform
minibatches of all N examples (removed examples contribute weight 0), a fixed number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn
from torch.func import functional_call

from attribution_core import (
    AdamEpsOption,
    Batch,
    Checkpoint,
    CurvatureProblem,
    DrawStreams,
    Measurement,
    OptimizerConfig,
    OptimizerOption,
    Params,
    StepBatch,
    Task,
    TrainingRecipe,
    WarmupStepsOption,
    recipe_description,
    row_chunks,
)
from attribution_supervised.measurements import CrossEntropy
from attribution_supervised.replay import check_every, keep, snapshot


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``X: (1797, 64)`` in [0, 1], ``y: (1797,)`` int64 — scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float64), d.target.astype(np.int64)


class DigitsClassifierOptions(BaseModel):
    """Options of ``digits-classifier``."""

    model_config = ConfigDict(extra="forbid")
    classes: list[int] = Field(list(range(10)), description="Digit classes used (0–9).")
    n_train: int = Field(500, ge=10, description="Training examples (rest held out for queries).")
    hidden: int = Field(32, ge=1, description="Hidden width of the MLP.")
    steps: int = Field(400, ge=1, description="Adam steps.")
    lr: float = Field(1e-2, gt=0.0, description="Adam learning rate.")
    batch_size: int = Field(64, ge=1, description="Minibatch size.")
    l2: float = Field(1e-3, ge=0.0, description="λ of λ‖θ‖² (keeps the Hessian well-posed).")
    optimizer: OptimizerOption = "adam"
    adam_eps: AdamEpsOption = 1e-8
    warmup_steps: WarmupStepsOption = 0

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int]) -> list[int]:
        bad = [c for c in v if not 0 <= c <= 9]
        if bad or len(set(v)) < 2:
            raise ValueError(f"classes must be ≥ 2 distinct digits in 0–9, got {v}")
        return sorted(set(v))


class DigitsClassifierTask(Task):
    """MLP ``64 → hidden → n_classes`` (tanh) trained with Adam."""

    name = "digits-classifier"
    supervised_kind = "classification"

    def __init__(
        self,
        classes: list[int] | None = None,
        n_train: int = 500,
        hidden: int = 32,
        steps: int = 400,
        lr: float = 1e-2,
        batch_size: int = 64,
        l2: float = 1e-3,
        optimizer: str = "adam",
        adam_eps: float = 1e-8,
        warmup_steps: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.dtype, self.device = dtype, torch.device(device)
        self.classes = classes or list(range(10))
        self.hidden, self.steps, self.lr, self.bs, self.l2 = hidden, steps, lr, batch_size, l2
        self.optimizer = OptimizerConfig(optimizer, lr, eps=adam_eps, warmup_steps=warmup_steps)  # type: ignore[arg-type]
        X, y = load_digits_arrays()
        keep = np.isin(y, self.classes)
        X, y = X[keep], np.searchsorted(self.classes, y[keep])
        perm = np.random.default_rng(0).permutation(len(y))
        n_train = min(n_train, len(y) - 1)
        tr, te = perm[:n_train], perm[n_train:]
        self._data = self._batch(X[tr], y[tr])
        self._held_out = self._batch(X[te], y[te])
        self.options = {
            "classes": self.classes,
            "n_train": n_train,
            "hidden": hidden,
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "l2": l2,
        }
        self.options.update(recipe_description(optimizer, adam_eps, warmup_steps))

    def _batch(self, X: np.ndarray, y: np.ndarray) -> Batch:
        return {
            "x": torch.as_tensor(X, dtype=self.dtype, device=self.device),
            "y": torch.as_tensor(y, dtype=torch.long, device=self.device),
        }

    def train_data(self) -> Batch:
        """``{"x": (N, 64) in [0, 1], "y": (N,) int64 class index}``."""
        return self._data

    def build_model(self, seed: int) -> nn.Module:
        """Fresh MLP from ``seed``."""
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(64, self.hidden), nn.Tanh(), nn.Linear(self.hidden, len(self.classes))
        ).to(self.device, self.dtype)

    def train(self, model: nn.Module, weights: Tensor, seed: int) -> nn.Module:
        """Adam (or SGD) on ``(1/N) Σ_j w_j CE_j + λ‖θ‖²`` over uniform minibatches, ``steps``
        steps (learning rate after the optional warm-up: ``OptimizerConfig.lr_at``)."""
        for _ in self._adam_steps(model, weights, seed):
            pass
        return model.eval()

    def _adam_steps(
        self, model: nn.Module, weights: Tensor, seed: int
    ) -> Iterator[tuple[int, torch.optim.Optimizer]]:
        """Train in place; yield ``(step, optimiser)`` after each of the ``steps`` steps."""
        gen = torch.Generator().manual_seed(seed)
        x, y = self._data["x"], self._data["y"]
        w = weights.to(self.device, self.dtype)
        n = x.shape[0]
        cfg = self.optimizer
        if cfg.kind == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.eps)
        model.train()
        for step in range(1, self.steps + 1):
            idx = torch.randint(n, (min(self.bs, n),), generator=gen).to(self.device)
            ce = nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none")
            loss = (w[idx] * ce).mean() + self.regularizer(dict(model.named_parameters()))
            opt.zero_grad()
            loss.backward()
            if cfg.warmup_steps > 0:
                opt.param_groups[0]["lr"] = cfg.lr_at(step)
            opt.step()
            yield step, opt

    def checkpoints(
        self, seed: int, every: int, *, optimizer_state: bool = False
    ) -> list[Checkpoint]:
        """States after steps ``every, 2·every, …, steps`` of ``base_model(seed)``'s Adam run."""
        check_every(every)
        model = self.build_model(seed)
        out = []
        for step, opt in self._adam_steps(model, torch.ones(self.n_train, dtype=self.dtype), seed):
            if keep(step, every, self.steps):
                adam = optimizer_state and self.optimizer.kind == "adam"  # SGD: no moments
                lr = self.optimizer.lr_at(step)
                out.append(snapshot(step, model, lr, opt if adam else None))
        return out

    # ---- training-step hook (single-model retraining, metagradients) -------------------------
    def training_recipe(self) -> TrainingRecipe:
        """``train``'s optimiser for ``steps`` steps on minibatches of ``min(batch_size, N)``."""
        n = self._data["x"].shape[0]
        self._step_module  # built here, outside any torch.func transform  # noqa: B018
        return TrainingRecipe(self.steps, min(self.bs, n), self.optimizer)

    def draw_stream(self, seed: int, step: int) -> StepBatch:
        """Step ``step``'s ``B`` indices, uniform over all N (``train``'s generator, in order)."""
        self._step_module  # built here, outside any torch.func transform  # noqa: B018
        return self._draw_streams(seed, step)

    def step_loss(self, params: Params, batch: StepBatch, weights: Tensor) -> Tensor:
        """``Σ_b w_{i_b} CE_{i_b} / B + λ‖θ‖²`` — :meth:`train`'s minibatch loss, functionally."""
        x, y = self._data["x"], self._data["y"]
        idx = batch.indices.to(self.device)
        logits = functional_call(self._step_module, dict(params), (x[idx],))
        ce = nn.functional.cross_entropy(logits, y[idx], reduction="none")
        w = weights.to(self.device, self.dtype)
        return (w[idx] * ce).mean() + self.regularizer(params)

    @cached_property
    def _draw_streams(self) -> DrawStreams:
        n = self._data["x"].shape[0]
        size = min(self.bs, n)
        return DrawStreams(lambda gen, step: StepBatch(torch.randint(n, (size,), generator=gen)))

    @cached_property
    def _step_module(self) -> nn.Module:
        """An MLP whose parameters :meth:`step_loss` replaces (the global RNG is left alone)."""
        with torch.random.fork_rng(devices=[]):
            return self.build_model(0)

    def make_queries(self, model: nn.Module, n: int, seed: int) -> Batch:
        """``n`` held-out examples chosen by ``seed``."""
        pool = self._held_out["x"].shape[0]
        idx = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[:n]
        return {k: v[idx.to(self.device)] for k, v in self._held_out.items()}

    def training_loss(self, n_samples: int | None = None) -> Measurement:
        """Cross-entropy."""
        return CrossEntropy()

    def curvature_problem(self, model: nn.Module, seed: int, n_samples: int) -> CurvatureProblem:
        """``CrossEntropyLoss(sum)`` on the logits, scale ``1/N``."""
        x, y = self._data["x"], self._data["y"]
        n = x.shape[0]

        def batches(pass_index: int, rows: slice | None = None) -> list[tuple[Tensor, Tensor]]:
            return [(x[r], y[r]) for r in row_chunks(rows, n, 256)]  # no noise: any pass

        return CurvatureProblem(
            model=model,
            loss_function=nn.CrossEntropyLoss(reduction="sum"),
            batches=batches,
            scale=1.0 / n,
            n_rows=n,
        )

    def images(self, batch: Batch) -> Tensor:
        """``(B, 1, 8, 8)`` in [0, 1]."""
        return batch["x"].reshape(-1, 1, 8, 8).clamp(0, 1)

    def describe(self) -> dict:
        """Name and options."""
        return {"name": self.name, **self.options}
