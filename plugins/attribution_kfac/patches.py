"""Input-side K-FAC kernels for ``nn.Linear`` / ``nn.Conv2d``: covariances and patch matrices.

For a Conv2d with weight ``(C_out, C_in, kh, kw)`` the K-FAC-expand input factor is
``Σ_rows Σ_o u(o) u(o)ᵀ`` over output positions ``o``, where ``u(o) ∈ R^D``, ``D = C_in·kh·kw``,
is the zero-padded input patch in the weight's ``(c, i, j)`` order (what ``F.unfold`` returns).
Building it from unfolded patches costs ``L·D²`` multiply-adds per row (``L`` output positions):
``kh·kw·C_in/C_out`` times the layer's forward. For stride-1 convolutions this module uses the
Toeplitz structure instead: the ``(C_in × C_in)`` block of kernel offsets ``(a, b)`` is

    Σ_q x(q) x(q + Δ)ᵀ,  Δ = dilation·(b − a),

summed over the input positions ``q`` that the window of ``a`` covers. That is one GEMM per
distinct ``Δ`` (13 for 3×3 instead of 81 blocks; symmetry halves the rest) over a zero-padded,
channels-last, flattened copy of the input, minus thin boundary strips where the window of ``a``
stops short of the image (inclusion–exclusion per dimension). The result equals the unfolded
GEMM up to float round-off (summation order); ``tests/kfac/test_kfac_patches.py`` checks it
against ``F.unfold`` on random geometries.

Everything else (strided convs, Linear layers) is a single GEMM on a contiguous matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ConvGeometry:
    """Static geometry of a supported Conv2d (groups 1, integer zero padding)."""

    c_in: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def d_in(self) -> int:
        """``D = C_in·kh·kw``."""
        return self.c_in * self.kernel[0] * self.kernel[1]

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """Output spatial size for an ``h × w`` input."""
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(
                (h, w), self.padding, self.dilation, self.kernel, self.stride, strict=True
            )
        )


def conv_geometry(module: nn.Module) -> ConvGeometry | None:
    """The geometry of ``module`` if these kernels support it, else None.

    Supported: ``nn.Conv2d`` with ``groups == 1``, ``padding_mode == "zeros"`` and integer (or
    ``"valid"``) padding. Grouped convolutions and string ``"same"`` padding are left to
    curvlinops.
    """
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        return None
    if module.padding_mode != "zeros":
        return None
    pad = module.padding
    if isinstance(pad, str):
        if pad != "valid":
            return None
        pad = (0, 0)
    return ConvGeometry(
        module.in_channels, tuple(module.kernel_size), tuple(module.stride), tuple(pad),
        tuple(module.dilation),
    )  # fmt: skip


# ---- patches ---------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _cl_to_weight_order(c: int, kh: int, kw: int) -> Tensor:
    """Index ``perm`` with ``P_weight[..., m] = P_cl[..., perm[m]]``.

    ``P_cl`` orders a patch as ``(i, j, c)`` (channels last, what a strided view of an NHWC
    tensor gives), the weight as ``(c, i, j)``.
    """
    return torch.arange(kh * kw * c).reshape(kh, kw, c).permute(2, 0, 1).reshape(-1)


def patch_matrix_cl(x: Tensor, g: ConvGeometry) -> Tensor:
    """Unfolded patches ``(B, L, D)`` of ``x: (B, C, H, W)`` in channels-last ``(i, j, c)`` order.

    One gather copy from a zero-padded NHWC view (no ``F.unfold`` + transpose copies). Use
    :func:`cl_order` to map ``D``-indices to the weight's ``(c, i, j)`` order.
    """
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel, g.stride, g.padding, g.dilation
    ho, wo = g.out_size(h, w)
    xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()
    s0, s1, s2, s3 = xp.stride()
    view = xp.as_strided((b, ho, wo, kh, kw, c), (s0, sh * s1, sw * s2, dh * s1, dw * s2, s3))
    return view.reshape(b, ho * wo, kh * kw * c)


def cl_order(g: ConvGeometry, device: torch.device) -> Tensor:
    """``perm`` such that ``patch_matrix_cl(x)[..., perm]`` is in the weight's ``(c, i, j)`` order."""
    return _cl_to_weight_order(g.c_in, *g.kernel).to(device)


def reduce_patches(x: Tensor, g: ConvGeometry) -> Tensor:
    """Patches averaged over output positions, ``(B, D)`` in ``(c, i, j)`` order (K-FAC-reduce)."""
    u = F.unfold(x, g.kernel, dilation=g.dilation, padding=g.padding, stride=g.stride)
    return u.mean(-1)


def patch_sum(x: Tensor, g: ConvGeometry) -> Tensor:
    """``Σ_rows Σ_o u(o)``: ``(D,)`` in ``(c, i, j)`` order (the bias column of a joint factor)."""
    xs = x.sum(0, keepdim=True)
    u = F.unfold(xs, g.kernel, dilation=g.dilation, padding=g.padding, stride=g.stride)
    return u.sum((0, 2))


# ---- conv input covariance -------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Blocks of the Toeplitz computation for one (geometry, H, W).

    ``deltas``: the distinct flattened offsets ``Δ1·Wp + Δ2`` (main GEMMs). ``blocks``: per
    kernel-offset pair ``a ≤ b`` (flattened), ``(a, b, delta, terms)`` with ``terms`` a tuple of
    ``(sign, rows, cols)``; ``rows``/``cols`` = ``None`` (the whole image) or a ``(lo, hi)``
    strip to subtract or add back.
    """

    hp: int
    wp: int
    deltas: tuple[int, ...]
    blocks: tuple[tuple[int, int, int, tuple[tuple[int, object, object], ...]], ...]


def _ranges_1d(n: int, k: int, p: int, d: int) -> dict[tuple[int, int], tuple]:
    """Per kernel pair ``(a, b)`` in one dimension: ``(Δ, [strips to exclude])`` or None (empty).

    The window of offset ``a`` covers input positions ``q ∈ [max(0, d·a − p), min(n, n_out +
    d·a − p))``; the pair's sum runs over those ``q`` with ``q + Δ ∈ [0, n)``. The natural range
    of ``Δ`` is ``[max(0, −Δ), min(n, n − Δ))``; what the window cuts off at either end is
    returned as strips.
    """
    n_out = n + 2 * p - d * (k - 1)
    out: dict[tuple[int, int], tuple] = {}
    for a in range(k):
        for b in range(k):
            delta = d * (b - a)
            nat_lo, nat_hi = max(0, -delta), min(n, n - delta)
            lo = max(nat_lo, d * a - p)
            hi = min(nat_hi, n_out + d * a - p)
            if lo >= hi:
                out[(a, b)] = None
                continue
            strips = []
            if lo > nat_lo:
                strips.append((nat_lo, lo))
            if hi < nat_hi:
                strips.append((hi, nat_hi))
            out[(a, b)] = (delta, strips)
    return out


@lru_cache(maxsize=256)
def _plan(g: ConvGeometry, h: int, w: int) -> _Plan:
    (kh, kw), (ph, pw), (dh, dw) = g.kernel, g.padding, g.dilation
    hp, wp = h + dh * (kh - 1), w + dw * (kw - 1)
    rows, cols = _ranges_1d(h, kh, ph, dh), _ranges_1d(w, kw, pw, dw)
    offsets = [(i, j) for i in range(kh) for j in range(kw)]
    blocks = []
    deltas: set[int] = set()
    for ia, (a1, a2) in enumerate(offsets):
        for ib in range(ia, len(offsets)):
            b1, b2 = offsets[ib]
            r, c = rows[(a1, b1)], cols[(a2, b2)]
            if r is None or c is None:
                continue  # the windows never overlap the image together: a zero block
            (d1, r_strips), (d2, c_strips) = r, c
            off = d1 * wp + d2  # ≥ 0: a ≤ b in row-major order
            deltas.add(off)
            # 1_R = (1_N − Σ row strips) ⊗ (1_N − Σ col strips), expanded
            terms = [(1, None, None)]
            terms += [(-1, s, None) for s in r_strips] + [(-1, None, s) for s in c_strips]
            terms += [(1, s, t) for s in r_strips for t in c_strips]
            blocks.append((ia, ib, off, tuple(terms)))
    return _Plan(hp, wp, tuple(sorted(deltas)), tuple(blocks))


def _conv_covariance_toeplitz(x: Tensor, g: ConvGeometry) -> Tensor:
    b, c, h, w = x.shape
    plan = _plan(g, h, w)
    hp, wp = plan.hp, plan.wp
    m, tail = b * hp * wp, max(plan.deltas, default=0)
    # zero-padded NHWC copy, flattened to (m, C), with `tail` zero rows so that every shifted
    # window X[off : off + m] is a view
    buf = x.new_zeros(m + tail, c)
    buf[:m].view(b, hp, wp, c)[:, :h, :w].copy_(x.permute(0, 2, 3, 1))
    X = buf[:m]
    main = {off: X.T @ buf[off : off + m] for off in plan.deltas}
    strips: dict[tuple, Tensor] = {}

    def strip(off: int, rows, cols) -> Tensor:
        key = (off, rows, cols)
        if key not in strips:
            r, q = slice(*(rows or (0, h))), slice(*(cols or (0, w)))
            left = X.view(b, hp, wp, c)[:, r, q].reshape(-1, c)
            right = buf[off : off + m].view(b, hp, wp, c)[:, r, q].reshape(-1, c)
            strips[key] = left.T @ right
        return strips[key]

    kk = g.kernel[0] * g.kernel[1]
    out = x.new_empty(c, kk, c, kk)
    zero = set(range(kk * kk))
    for ia, ib, off, terms in plan.blocks:
        block = main[off]
        if len(terms) > 1:
            block = block.clone()
            for sign, rows, cols in terms[1:]:
                block.add_(strip(off, rows, cols), alpha=sign)
        out[:, ia, :, ib] = block
        out[:, ib, :, ia] = block.T
        zero.difference_update((ia * kk + ib, ib * kk + ia))
    for z in zero:  # pairs whose windows never overlap the image together
        out[:, z // kk, :, z % kk] = 0.0
    return out.view(c * kk, c * kk)


def conv_input_covariance(x: Tensor, g: ConvGeometry) -> Tensor:
    """``Σ_rows Σ_o u(o) u(o)ᵀ``: ``(D, D)`` in the weight's ``(c, i, j)`` order.

    Stride 1: the Toeplitz computation (module doc); other strides: one GEMM of the unfolded
    patches. Both equal ``U Uᵀ`` from ``F.unfold`` up to round-off.
    """
    if g.stride == (1, 1):
        return _conv_covariance_toeplitz(x, g)
    P = patch_matrix_cl(x, g)
    P = P.reshape(-1, P.shape[-1])
    perm = cl_order(g, x.device)
    return (P.T @ P)[perm][:, perm]
