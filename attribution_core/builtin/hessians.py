"""Builtin Hessian approximations: ``identity`` and ``dense`` (exact, for tiny models)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from attribution_core.errors import ConfigError, NumericalError
from attribution_core.gradients import example_noise
from attribution_core.interfaces import (
    Curvature,
    FitInputs,
    HessianApproximation,
    Measurement,
    Phase,
    PlanSizes,
    Task,
    batch_size,
    index_batch,
)


class DampingOptions(BaseModel):
    """Damping shared by parameter-space approximations."""

    model_config = ConfigDict(extra="forbid")
    damping: float = Field(0.0, ge=0.0, description="λ in (H + λI)⁻¹ (absolute, or c if relative).")
    damping_mode: Literal["absolute", "relative"] = Field(
        "absolute", description="relative: λ = damping · tr(H)/p."
    )


class IdentityOptions(DampingOptions):
    """Options of the ``identity`` Hessian."""


class DenseOptions(DampingOptions):
    """Options of the ``dense`` Hessian."""

    curvature: Literal["hessian", "ggn"] = Field(
        "hessian", description="Exact Hessian of L_D, or its GGN (via task.curvature_problem)."
    )
    max_params: int = Field(5000, ge=1, description="Refuse models with more parameters.")
    n_samples: int = Field(1, ge=1, description="MC draws per example for the GGN pass.")


class ScaledIdentity(Curvature):
    """``(I + λI)⁻¹ G = G / (1 + λ)``."""

    def __init__(self, damping: float) -> None:
        self.damping = damping

    def solve(self, gradients: Tensor) -> Tensor:
        """``G / (1 + λ)``."""
        return gradients / (1.0 + self.damping)

    def describe(self) -> dict[str, Any]:
        return {"damping": self.damping}


class IdentityHessian(HessianApproximation):
    """``H = I`` — gradient dot products (``grad-dot``)."""

    name = "identity"

    def __init__(self, damping: float = 0.0, damping_mode: str = "absolute") -> None:
        self.damping = damping

    def fit(self, inputs: FitInputs) -> Curvature:
        """``(1 + λ)⁻¹ I``: nothing to fit."""
        return ScaledIdentity(self.damping)

    def plan(self, sizes: PlanSizes) -> Phase:
        """Nothing to fit: no rows, no arrays."""
        return Phase("fit", 0, (), 0, "identity: nothing to fit")


class DenseCurvature(Curvature):
    """Cholesky factor of ``H + λI`` (float64); ``solve`` applies its inverse."""

    def __init__(self, matrix: Tensor, damping: float, what: str) -> None:
        self.matrix = matrix
        self.damping = damping
        p = matrix.shape[0]
        damped = matrix.double() + damping * torch.eye(p, dtype=torch.float64, device=matrix.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:
            eig_min = float(torch.linalg.eigvalsh(damped).min())
            raise NumericalError(
                f"dense {what} + damping {damping:g} is not positive definite (smallest eigenvalue "
                f"{eig_min:.3e}); increase `damping` (e.g. {max(-eig_min, 1e-8) * 10:.1e})"
            )
        self.chol = chol

    def solve(self, gradients: Tensor) -> Tensor:
        """``(H + λI)⁻¹ G`` row-wise, in float64, cast back to the input dtype."""
        sol = torch.cholesky_solve(gradients.double().T, self.chol).T
        return sol.to(gradients.dtype)

    def describe(self) -> dict[str, Any]:
        return {"damping": self.damping, "n_params": int(self.matrix.shape[0])}


class DenseHessian(HessianApproximation):
    """Exact Hessian (or GGN) of ``L_D`` (+ regulariser) as a dense ``(p, p)`` float64 matrix."""

    name = "dense"

    def __init__(
        self,
        damping: float = 0.0,
        damping_mode: str = "absolute",
        curvature: str = "hessian",
        max_params: int = 5000,
        n_samples: int = 1,
    ) -> None:
        self.damping = damping
        self.damping_mode = damping_mode
        self.curvature = curvature
        self.max_params = max_params
        self.n_samples = n_samples

    def plan(self, sizes: PlanSizes) -> Phase:
        """``H`` and its factorisation: two ``(p, p)`` float64 matrices."""
        p = sizes.n_params
        return Phase(
            "fit", sizes.n_train, (p, p), 2 * p * p * 8, "dense (p, p) float64 H and its factor"
        )

    def fit(self, inputs: FitInputs) -> Curvature:
        """Build ``H`` (``dense_hessian``/``dense_ggn``) and factor ``H + λI``."""
        model, task, params, seed = inputs.model, inputs.task, inputs.params, inputs.seed
        p = sum(v.numel() for v in params.values())
        if p > self.max_params:
            raise ConfigError(
                f"hessian dense: model has {p} included parameters > max_params={self.max_params}; "
                f"use kfac/ekfac/ggn-cg, or raise max_params"
            )
        if self.curvature == "hessian":
            H = dense_hessian(model, task, inputs.train_function, params, seed)
        else:
            H = dense_ggn(model, task, params, seed, self.n_samples)
        damping = self.damping
        if self.damping_mode == "relative":
            damping = self.damping * float(torch.trace(H)) / p
        return DenseCurvature(H, damping, self.curvature)


def _flat_fn(model: nn.Module, params: Mapping[str, Tensor]):
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    fixed.update(dict(model.named_buffers()))

    def unflatten(theta: Tensor) -> dict[str, Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)}

    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    return theta0, unflatten, fixed


def dense_hessian(
    model: nn.Module,
    task: Task,
    measurement: Measurement,
    params: Mapping[str, Tensor],
    seed: int,
    chunk_size: int = 256,
) -> Tensor:
    """``∇²_θ [(1/N) Σ_j m(θ, x_j) + R(θ)]`` as ``(p, p)`` float64 (noise: stream ``train``)."""
    theta0, unflatten, fixed = _flat_fn(model, params)
    data = task.train_data()
    n = batch_size(data)
    H = torch.zeros(theta0.numel(), theta0.numel(), dtype=torch.float64, device=theta0.device)
    for start in range(0, n, chunk_size):
        chunk = index_batch(data, slice(start, min(start + chunk_size, n)))
        noise = example_noise(measurement, chunk, seed, "train", start)

        def chunk_loss(theta: Tensor, chunk=chunk, noise=noise) -> Tensor:
            state = {**fixed, **unflatten(theta)}

            def forward(*a: Any, **k: Any) -> Tensor:
                return functional_call(model, state, a, k)

            return measurement.evaluate(forward, chunk, noise).sum() / n

        H += hessian(chunk_loss)(theta0).double()

    def reg(theta: Tensor) -> Tensor:
        return task.regularizer(unflatten(theta))

    H += hessian(reg)(theta0).double()
    return H


def dense_ggn(
    model: nn.Module, task: Task, params: Mapping[str, Tensor], seed: int, n_samples: int = 1
) -> Tensor:
    """``scale · Σ_rows Jᵀ ∇²_f loss J`` (+ ∇²R) from ``task.curvature_problem`` (pass 0)."""
    problem = task.curvature_problem(model, seed, n_samples)
    by_id = {id(v): k for k, v in problem.model.named_parameters()}
    missing = [n for n, v in params.items() if id(v) not in by_id]
    if missing:
        raise ConfigError(
            f"curvature problem of task {task.name!r} does not share parameters {missing[:3]}"
        )
    names = [by_id[id(v)] for v in params.values()]
    theta0, unflatten_task, _ = _flat_fn(model, params)
    fixed = {k: v.detach() for k, v in problem.model.named_parameters() if k not in names}
    fixed.update(dict(problem.model.named_buffers()))

    def outputs(theta: Tensor, inputs: Any) -> Tensor:
        mapped = dict(zip(names, unflatten_task(theta).values(), strict=True))
        return functional_call(problem.model, {**fixed, **mapped}, (inputs,))

    loss_fn = problem.loss_function

    def row_loss(out: Tensor, target: Tensor) -> Tensor:
        return loss_fn(out.unsqueeze(0), target.unsqueeze(0))

    p = theta0.numel()
    G = torch.zeros(p, p, dtype=torch.float64, device=theta0.device)
    for inputs, targets in problem.batches(0):
        J = jacrev(outputs)(theta0, inputs).double()  # (B, k, p)
        out = outputs(theta0, inputs).detach()
        H_out = vmap(hessian(row_loss))(out, targets).double()  # (B, k, k)
        G += torch.einsum("bkp,bkl,blq->pq", J, H_out, J)
    G *= problem.scale
    G += hessian(lambda th: task.regularizer(unflatten_task(th)))(theta0).double()
    return G
