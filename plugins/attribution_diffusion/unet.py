"""A small DDPM U-Net: Conv2d + GroupNorm + SiLU residual blocks, one self-attention block made of
``nn.Linear`` layers (no ``nn.MultiheadAttention``: K-FAC models only Linear/Conv2d), and a
sinusoidal time embedding through ``nn.Linear``.

``model(x_t, t) -> ε_θ(x_t, t)``: ``x_t: (B, C, H, W)``, ``t: (B,)`` int64 timesteps in 1..T,
output ``(B, C, H, W)``. Written for ``torch.func`` (vmap/grad/functional_call): no in-place ops
on inputs, no data-dependent Python control flow, no ``.item()``; dropout is absent.

Layout for ``channel_mult = [1, 2]`` (levels ``L = 2``) on 8×8 inputs::

    conv_in (C→w) → [ResBlock(w) ×n, Downsample] @8×8 → [ResBlock(2w) ×n] @4×4
    → middle: ResBlock, Attention, ResBlock @4×4
    → [ResBlock(cat skip) ×n, Upsample] up the levels → GroupNorm, SiLU, conv_out (w→C)

The image side must be divisible by ``2**(L-1)`` (checked by :func:`check_image_size`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attribution_core import ConfigError


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


def check_image_size(image_size: int, channel_mult: list[int]) -> None:
    """Raise :class:`ConfigError` unless ``image_size`` halves cleanly ``len(channel_mult)-1`` times."""
    factor = 2 ** (len(channel_mult) - 1)
    if image_size < factor * 2 or image_size % factor:
        valid = [factor * k for k in range(2, 6)]
        raise ConfigError(
            f"task.image_size: {image_size} cannot pass through a U-Net with "
            f"{len(channel_mult)} levels (channel_mult={channel_mult}): it must be a multiple of "
            f"{factor} and ≥ {2 * factor}, e.g. {valid}; change image_size or channel_mult"
        )


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``(B,) -> (B, dim)`` (Transformer style, max period 10 000)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float64) / half
    )
    args = t.to(torch.float64)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class ResBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))) + Linear(emb))))`` with a 1×1 skip if widths differ."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the ``H·W`` positions, from ``nn.Linear`` layers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=2)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=2)
        out = self.proj(att @ v).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class Downsample(nn.Module):
    """Stride-2 3×3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 (by ``repeat_interleave``, vmap-safe) then a 3×3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


class UNet(nn.Module):
    """ε-prediction U-Net (see module docstring).

    Args:
        channels: image channels ``C``.
        width: base channel count ``w``.
        channel_mult: channels per resolution level, in multiples of ``w``.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        T: number of diffusion timesteps (kept for reference; the embedding takes any t).
    """

    def __init__(
        self,
        channels: int = 1,
        width: int = 32,
        channel_mult: tuple[int, ...] | list[int] = (1, 2),
        num_res_blocks: int = 1,
        T: int = 1000,
    ) -> None:
        super().__init__()
        self.width, self.T = width, T
        emb_dim = 4 * width
        self.time_in = nn.Linear(width, emb_dim)
        self.time_out = nn.Linear(emb_dim, emb_dim)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        chans = [width * m for m in channel_mult]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [width]
        c = width
        for level, c_out in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, c_out, emb_dim))
                c = c_out
                skips.append(c)
            self.down.append(blocks)
            if level < len(chans) - 1:
                self.downsample.append(Downsample(c))
                skips.append(c)
        self.mid1 = ResBlock(c, c, emb_dim)
        self.attn = Attention(c)
        self.mid2 = ResBlock(c, c, emb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, c_out in reversed(list(enumerate(chans))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(c + skips.pop(), c_out, emb_dim))
                c = c_out
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(Upsample(c))
        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = nn.Conv2d(c, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``ε_θ(x_t, t)``: ``x: (B, C, H, W)``, ``t: (B,)`` int64 in 1..T → ``(B, C, H, W)``."""
        emb = timestep_embedding(t, self.width).to(x.dtype)
        emb = self.time_out(F.silu(self.time_in(emb)))
        h = self.conv_in(x)
        hs = [h]
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        for level, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if level < len(self.upsample):
                h = self.upsample[level](h)
        return self.conv_out(F.silu(self.norm_out(h)))
