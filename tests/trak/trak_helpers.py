"""Helpers for the TRAK plugin tests: small float64 runs and independent dense references."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

torch.set_num_threads(1)


def lr_config(methods: list[Any], **extra: Any) -> dict[str, Any]:
    """A float64 linear-regression run (N=30, d=4 → p=5), target mse, 3 generated queries."""
    cfg: dict[str, Any] = {
        "task": {"name": "linear-regression", "n_train": 30, "dim": 4},
        "queries": {"source": "generated", "count": 3},
        "target": "mse",
        "dtype": "float64",
        "methods": methods,
    }
    cfg.update(extra)
    return cfg


def included_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Linear weights and biases in module order (the core's parameter order), by hand."""
    out = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            out += [module.weight, module.bias]
    return out


def loop_gradients(model: nn.Module, loss_fn, xs: torch.Tensor, ys: torch.Tensor) -> np.ndarray:
    """``(n, p)`` per-example gradients by a Python loop of ``torch.autograd.grad`` (float64)."""
    params = included_parameters(model)
    rows = []
    for x, y in zip(xs, ys, strict=True):
        loss = loss_fn(model(x.unsqueeze(0)), y.unsqueeze(0))
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).detach().double())
    return torch.stack(rows).numpy()


def dense_fisher_influence(G: np.ndarray, Gq: np.ndarray, lam: float) -> np.ndarray:
    """``scores[j, i] = g_qiᵀ (F + λI)⁻¹ g_j`` with ``F = (1/N) Σ_j g_j g_jᵀ`` (numpy, float64)."""
    n, p = G.shape
    F = G.T @ G / n
    return G @ np.linalg.solve(F + lam * np.eye(p), Gq.T)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference relative to the largest entry of ``b``."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def linear_gradients(task, model, batch) -> np.ndarray:
    """Closed form: ℓ = (y − wᵀx − b)², ∇_w = −2 r x, ∇_b = −2 r (weight first, then bias)."""
    x, y = batch["x"].double(), batch["y"].double()
    r = y - (x @ model.weight.detach().double().T).squeeze(1) - model.bias.detach().double()
    return torch.cat([-2 * r[:, None] * x, -2 * r[:, None]], dim=1).numpy()
