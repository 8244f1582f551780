"""Arnoldi iteration with full reorthogonalisation (float64) for a symmetric operator.

Schioppa et al. (2022), "Scaling Up Influence Functions", Alg. 1: ``m`` steps of Arnoldi on
``A`` from a random start ``q_0`` build an orthonormal Krylov basis ``Q: (p, m)`` and the
Rayleigh quotient ``T = Qᵀ A Q: (m, m)`` (upper Hessenberg; tridiagonal for symmetric ``A`` up
to round-off, which we remove by symmetrising). The eigenpairs ``(θ_i, s_i)`` of ``T`` give Ritz
pairs ``(θ_i, Q s_i)`` of ``A``; the extreme ones converge first. Every new vector is
orthogonalised twice against all of ``Q`` ("twice is enough"), so the basis stays orthonormal
to round-off in float64. If the Krylov space becomes invariant (``‖w‖`` ≈ 0: repeated or zero
eigenvalues), the iteration restarts from a fresh random vector orthogonal to ``Q``, so ``m = p``
steps recover the full eigendecomposition.

Cost: ``m`` products ``A v`` and ``O(p m²)`` flops; memory ``Q``: ``p · m`` float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RitzPairs:
    """Ritz values and vectors of a symmetric operator, sorted by ``|θ|`` descending.

    Attributes:
        values: ``(m,)`` float64 Ritz values ``θ_i``.
        vectors: ``(p, m)`` float64 orthonormal Ritz vectors ``u_i = Q s_i``.
        residuals: ``(m,)`` ``‖A u_i − θ_i u_i‖`` bounds from the last Arnoldi step
            (``|h_{m+1,m}| · |s_{m,i}|``; round-off when ``m = p``).
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor


def _orthogonalise(w: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """``w − Q Qᵀ w`` done twice; returns ``(w', Qᵀ w)`` (the summed coefficients)."""
    h = Q.T @ w
    w = w - Q @ h
    h2 = Q.T @ w
    return w - Q @ h2, h + h2


def arnoldi(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    steps: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> RitzPairs:
    """Ritz pairs of a symmetric ``A: (n, n)`` from ``steps`` Arnoldi steps (module doc).

    Args:
        matvec: ``(n, 1) float64 -> (n, 1) float64``, the product ``A v``.
        n: dimension of ``A``.
        steps: Krylov dimension ``m`` (clipped to ``n``).
        seed: seed of the random start vector (and of restart vectors).
        device: where the basis lives.

    Returns:
        :class:`RitzPairs` with ``m`` pairs, largest ``|θ|`` first.
    """
    m = min(int(steps), n)
    gen = torch.Generator().manual_seed(int(seed))
    Q = torch.zeros(n, m, dtype=torch.float64, device=device)
    T = torch.zeros(m + 1, m, dtype=torch.float64, device=device)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    q = q / q.norm()
    for j in range(m):
        Q[:, j] = q
        w = matvec(q[:, None])[:, 0].to(torch.float64)
        w, h = _orthogonalise(w, Q[:, : j + 1])
        T[: j + 1, j] = h
        beta = w.norm()
        if j + 1 == m:
            T[j + 1, j] = beta
            break
        if beta <= 1e-10 * T[: j + 1, : j + 1].abs().max().clamp_min(1e-300):
            # invariant subspace found: continue from a random direction orthogonal to Q
            w = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
            w, _ = _orthogonalise(w, Q[:, : j + 1])
            beta = torch.zeros((), dtype=torch.float64, device=device)
        else:
            T[j + 1, j] = beta
        q = w / w.norm()
    square = T[:m, :m]
    theta, S = torch.linalg.eigh((square + square.T) / 2)
    order = torch.argsort(theta.abs(), descending=True)
    theta, S = theta[order], S[:, order]
    residuals = (T[m, m - 1] * S[m - 1, :]).abs()
    return RitzPairs(theta, Q @ S, residuals)
