"""Sparse Johnson–Lindenstrauss transform (``projection: sjlt``): Φ with ``s`` nonzeros per row.

Φ: ``(p, k)``; the ``k`` output coordinates are split into ``s`` blocks of ``k/s``, and parameter
``i`` has one entry ``±1/√s`` in each block, at a column and with a sign drawn from the seed
(the block construction of Kane & Nelson, "Sparser Johnson–Lindenstrauss Transforms", JACM 2014:
``s`` independent CountSketches of ``k/s`` buckets, averaged). Then ``‖Φᵀe_i‖ = 1`` exactly,
``E[ΦΦᵀ] = I`` (inner products are unbiased), and for ``u, v ∈ R^p``

    Var[(Φᵀu)ᵀ(Φᵀv)] = (‖u‖²‖v‖² + (uᵀv)² − 2 Σ_i u_i² v_i²) / k,

never above the Gaussian projection's ``(‖u‖²‖v‖² + (uᵀv)²) / k``. Projecting ``n`` rows costs
``n·p·s`` multiply-adds (one sparse × dense product) instead of the dense ``n·p·k`` plus drawing
``p·k`` normals: Φ is held as ``p·s`` indices and signs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sjlt_transpose(p: int, k: int, s: int, seed: int, dtype: torch.dtype, device) -> Tensor:
    """``Φᵀ``: a coalesced sparse COO ``(k, p)`` tensor with ``p·s`` entries ``±1/√s``.

    Drawn on the CPU from ``seed`` (columns, then signs) and moved to ``device``.
    """
    if k % s:
        raise ValueError(f"proj_dim {k} is not a multiple of sjlt_nnz {s}")
    gen = torch.Generator().manual_seed(seed)
    width = k // s
    cols = torch.randint(0, width, (p, s), generator=gen) + torch.arange(s) * width
    signs = torch.randint(0, 2, (p, s), generator=gen, dtype=torch.int8)
    vals = (signs.to(dtype) * 2 - 1) / math.sqrt(s)
    rows = torch.arange(p).repeat_interleave(s)
    index = torch.stack([cols.reshape(-1), rows])
    phi_t = torch.sparse_coo_tensor(index, vals.reshape(-1), (k, p), check_invariants=True)
    return phi_t.coalesce().to(device)


def sjlt_project(phi_t: Tensor, gradients: Tensor) -> Tensor:
    """``(n, p) -> (n, k)``: ``G Φ`` computed as ``(Φᵀ Gᵀ)ᵀ`` (one sparse × dense product)."""
    return torch.sparse.mm(phi_t, gradients.T.contiguous()).T.contiguous()
