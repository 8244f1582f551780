"""Conv2d input-side kernels (``attribution_kfac.patches``) against ``F.unfold`` in float64.

The reference for every kernel is recomputed here from ``torch.nn.functional.unfold`` (the
zero-padded patches ``u(o)`` in the weight's ``(c, i, j)`` order), never from the module's own
output: ``Σ_rows Σ_o u(o) u(o)ᵀ`` for :func:`conv_input_covariance` (Toeplitz blocks for stride
1, a GEMM otherwise), the patches themselves for :func:`patch_matrix_cl` + :func:`cl_order`,
their mean over positions for :func:`reduce_patches` and their sum for :func:`patch_sum`.

Tolerance: relative 1e-12 of the reference's largest entry. Both sides sum the same float64
products (≤ a few hundred per entry, entries O(1..100)) in a different order, so they differ by
round-off ~ n·2⁻⁵³·max ≈ 1e-14 relative; 1e-12 leaves margin, while any indexing, boundary
(strip), padding or dilation error moves entries by O(1) relative.
"""

from __future__ import annotations

import pytest
import torch
from attribution_kfac.patches import (
    cl_order,
    conv_geometry,
    conv_input_covariance,
    patch_matrix_cl,
    patch_sum,
    reduce_patches,
)
from torch import nn
from torch.nn import functional as F

RTOL = 1e-12

# (C_in, kernel, stride, padding, dilation, H, W, batch): odd/even H ≠ W, square and
# non-square kernels, strides 1 and 2, padding 0/1/2, dilation 1/2, including windows that
# reach past the image on every side and kernel pairs that never overlap the image together.
GEOMETRIES = [
    (1, 1, 1, 0, 1, 5, 4, 1),
    (2, 1, 1, 2, 1, 4, 7, 2),  # 1×1 with padding: outputs made of padding only
    (1, 3, 1, 1, 1, 5, 6, 3),
    (3, 3, 1, 0, 1, 7, 6, 2),
    (2, 3, 1, 2, 1, 4, 5, 1),
    (4, 3, 1, 1, 2, 6, 7, 2),
    (2, 3, 1, 2, 2, 3, 4, 3),  # dilated window larger than the image
    (1, 5, 1, 2, 1, 5, 6, 2),
    (3, 5, 1, 0, 1, 8, 5, 1),
    (2, 5, 1, 1, 2, 9, 10, 2),
    (2, (1, 3), 1, (0, 1), 1, 5, 6, 2),
    (3, (3, 1), 1, (1, 0), (2, 1), 6, 5, 3),
    (1, (2, 3), 1, (1, 2), (1, 2), 5, 8, 2),  # even kernel size
    (2, (3, 5), 1, (2, 1), (1, 2), 7, 9, 1),
    (1, 3, 2, 1, 1, 6, 5, 2),
    (3, 3, 2, 0, 1, 7, 8, 3),
    (2, 3, 2, 2, 2, 6, 7, 1),
    (4, 5, 2, 2, 1, 9, 6, 2),
    (2, 1, 2, 1, 1, 5, 4, 2),
    (2, (3, 1), (2, 1), (1, 0), 1, 6, 5, 2),  # non-square stride
    (3, (1, 3), (1, 2), (0, 2), (1, 2), 5, 9, 1),
    (1, (5, 3), 2, (2, 1), (1, 2), 8, 7, 3),
]


def _conv(c_in, kernel, stride, padding, dilation) -> nn.Conv2d:
    return nn.Conv2d(c_in, 2, kernel, stride=stride, padding=padding, dilation=dilation)


def _case(idx: int):
    c_in, kernel, stride, padding, dilation, h, w, batch = GEOMETRIES[idx]
    conv = _conv(c_in, kernel, stride, padding, dilation)
    geo = conv_geometry(conv)
    assert geo is not None
    gen = torch.Generator().manual_seed(idx)
    x = torch.randn(batch, c_in, h, w, generator=gen, dtype=torch.float64)
    U = F.unfold(  # (B, D, L): the reference patches
        x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    )
    return conv, geo, x, U


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= RTOL * max(scale, 1e-300), f"max error {err:.3e} vs max entry {scale:.3e}"


@pytest.mark.parametrize("idx", range(len(GEOMETRIES)))
def test_conv_input_covariance_equals_unfold(idx):
    conv, geo, x, U = _case(idx)
    want = torch.einsum("bdl,bel->de", U, U)
    _close(conv_input_covariance(x, geo), want)
    # the output size the kernels assume is the convolution's own
    assert geo.out_size(*x.shape[-2:]) == tuple(conv.double()(x).shape[-2:])
    assert geo.d_in == U.shape[1]


@pytest.mark.parametrize("idx", range(len(GEOMETRIES)))
def test_patch_matrix_cl_in_weight_order_equals_unfold(idx):
    _, geo, x, U = _case(idx)
    P = patch_matrix_cl(x, geo)
    perm = cl_order(geo, x.device)
    assert P.shape == (U.shape[0], U.shape[2], U.shape[1])
    assert torch.equal(P[..., perm], U.transpose(1, 2))  # a gather: exact, no arithmetic
    assert sorted(perm.tolist()) == list(range(U.shape[1]))


@pytest.mark.parametrize("idx", range(len(GEOMETRIES)))
def test_reduce_patches_and_patch_sum_equal_unfold(idx):
    _, geo, x, U = _case(idx)
    _close(reduce_patches(x, geo), U.mean(-1))
    _close(patch_sum(x, geo), U.sum((0, 2)))


def test_float32_input_keeps_its_dtype():
    _, geo, x, U = _case(5)
    got = conv_input_covariance(x.float(), geo)
    assert got.dtype == torch.float32
    want = torch.einsum("bdl,bel->de", U, U)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()  # float32 round-off


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 2, 3, groups=2),
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(2, 2, 3, padding="same"),
        nn.Linear(3, 2),
    ],
    ids=["groups", "reflect", "same", "linear"],
)
def test_unsupported_geometries_are_refused(conv):
    assert conv_geometry(conv) is None


def test_valid_padding_is_zero_padding():
    geo = conv_geometry(nn.Conv2d(2, 3, 3, padding="valid"))
    assert geo is not None and geo.padding == (0, 0)
