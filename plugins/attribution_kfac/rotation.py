"""EK-FAC's eigenvalue-correction kernel: per-row gradients squared in the Kronecker eigenbasis.

For a Linear/Conv2d layer with output gradients ``g`` and inputs (patches) ``a`` of one batch,
:func:`corrected_squares` returns ``Σ_rows (Q_Gᵀ ∇_W ℓ_row Q_A)²`` without materialising more
than one batch of per-row gradients, choosing per layer the cheaper side to rotate on (cost
model in its docstring). :class:`attribution_kfac.factors.FactorPasses` calls it once per layer
call and backward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attribution_kfac.patches import conv_geometry, patch_matrix_cl


def rows_positions_out(mod: nn.Module, g: Tensor) -> Tensor:
    """Output gradients per row: conv ``(B, C_out, L)`` (native layout), Linear ``(B, L, d_out)``."""
    if isinstance(mod, nn.Conv2d):
        return g.reshape(g.shape[0], g.shape[1], -1)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def rows_positions_in(mod: nn.Module, x: Tensor) -> Tensor:
    """Inputs per row ``(B, L, D)``; conv patches in channels-last order (``patches.cl_order``)."""
    if isinstance(mod, nn.Conv2d):
        return patch_matrix_cl(x, conv_geometry(mod))
    return x.reshape(x.shape[0], -1, x.shape[-1])


def cl_rows(perm: Tensor, joint: bool) -> Tensor:
    """Row order of ``Q_A`` matching channels-last patches (``[a, 1]`` keeps the 1 last)."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    if joint:
        inv = torch.cat([inv, inv.new_tensor([perm.numel()])])
    return inv


def corrected_squares(
    g: Tensor,
    conv: bool,
    qg: Tensor,
    a: Tensor | None,
    qa: Tensor,
    memo: dict[int, Tensor] | None = None,
    key: int = 0,
) -> Tensor:
    """``Σ_rows (Q_Gᵀ (Σ_l g_l a_lᵀ) Q_A)²``: ``(d_out, D)``.

    ``g``: conv ``(B, d_out, L)``, Linear ``(B, L, d_out)``; ``a: (B, L, D)`` with ``qa``'s rows
    in ``a``'s order. Without weight sharing (``L = 1``) the square factorises:
    ``(ĝ²)ᵀ (â²)``. Otherwise the per-row gradient is rotated on the cheaper side. ``memo``
    (if given) keeps the rotated inputs under ``key``, for further ``g`` with the same ``a``
    (``a`` may then be None: only the side that rotates the inputs first stores them).
    """
    gt = g if conv else g.transpose(1, 2)  # (B, d_out, L)
    _, d_out, L = gt.shape
    D = qa.shape[0]

    def rotated_inputs(make) -> Tensor:
        if memo is None:
            return make()
        if key not in memo:
            memo[key] = make()
        return memo[key]

    if L == 1:
        gh = gt[:, :, 0] @ qg
        return gh.square().T @ rotated_inputs(lambda: (a[:, 0, :] @ qa).square_())
    if L * (d_out * d_out + D * D) < d_out * D * (d_out + D):  # rotate g and a first
        rot = torch.bmm(qg.T @ gt, rotated_inputs(lambda: a @ qa))
    else:
        rot = qg.T @ torch.bmm(gt, a) @ qa
    return rot.square_().sum(0)
