"""LoGra's per-layer projections (Choe et al. 2024, §3.2, "LoGra: low-rank gradient projection").

For a Linear or Conv2d layer with weight ``W: (d_out, d_in)`` (Conv2d: ``d_in = C_in·kh·kw``,
the unfolded patch) and bias ``b: (d_out,)``, the per-example gradient of ``[W | b]`` is
``G = Σ_r g_r ãᵣᵀ`` over the example's rows ``r`` (draws, tokens, spatial positions), with
``g_r: (d_out,)`` the gradient w.r.t. the layer output and ``ã_r = [a_r; 1]: (d_in + 1,)`` the
layer input with a homogeneous coordinate (no ``1`` without a bias). LoGra projects both sides::

    φ = vec(P_out G P_inᵀ) = Σ_r vec((P_out g_r)(P_in ã_r)ᵀ) = (P_out ⊗ P_in) vec(G)   (row-major vec)

``P_in: (k_in, d_in + 1)``, ``P_out: (k_out, d_out)``, so ``φ`` has ``k_out·k_in`` entries per
layer and ``G`` is never formed. Entries: ``gaussian`` — ``N(0, 1/k)``; ``orthogonal`` —
``√(d/k)`` times ``k`` orthonormal rows (QR of a Gaussian), exactly orthogonal when ``k = d``.
Either way ``E[PᵀP] = I`` and so ``E[(P_out ⊗ P_in)ᵀ(P_out ⊗ P_in)] = I``: inner products are
preserved in expectation. ``k`` is capped at ``d`` (a larger random map only costs more).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from attribution_core import ConfigError

Kind = Literal["gaussian", "orthogonal"]


@dataclass(frozen=True)
class LayerProjection:
    """The two projections of one layer.

    Attributes:
        name: module name (``"down.0.conv"``).
        module: the ``nn.Linear`` / ``nn.Conv2d``.
        p_in: ``(k_in, d_in + bias)``, acts on (unfolded) inputs with the homogeneous 1.
        p_out: ``(k_out, d_out)``, acts on output gradients.
        bias: whether the layer's bias is a parameter (adds the homogeneous coordinate).
    """

    name: str
    module: nn.Module
    p_in: Tensor
    p_out: Tensor
    bias: bool

    @property
    def dim(self) -> int:
        """``k_out · k_in`` entries of this layer's projected gradient."""
        return self.p_out.shape[0] * self.p_in.shape[0]


def random_projection(k: int, d: int, kind: Kind, gen: torch.Generator) -> Tensor:
    """``(min(k, d), d)`` float64 with ``E[PᵀP] = I`` (see module docstring)."""
    k = min(int(k), int(d))
    if kind == "gaussian":
        return torch.randn(k, d, generator=gen, dtype=torch.float64) / math.sqrt(k)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q.T * math.sqrt(d / k)


def layer_projections(
    model: nn.Module,
    params: dict[str, Tensor],
    *,
    seed: int,
    proj_dim_in: int,
    proj_dim_out: int,
    kind: Kind,
) -> list[LayerProjection]:
    """One :class:`LayerProjection` per Linear/Conv2d module holding included ``params``.

    Layer ``i``'s projections come from a generator seeded by ``(seed, i)``, in module order,
    so the same seed gives the same projections on every model of the same architecture.

    Raises:
        ConfigError: a layer LoGra cannot hook (grouped or non-zero-padded Conv2d, a bias
            without its weight).
    """
    layers = []
    for i, (name, mod) in enumerate(_hooked_modules(model, params)):
        w_key, b_key = _key(name, "weight"), _key(name, "bias")
        bias = b_key in params
        if w_key not in params:
            raise ConfigError(f"logra: layer {name!r} has a trainable bias but a frozen weight")
        if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros"):
            raise ConfigError(
                f"logra: Conv2d {name!r} has groups={mod.groups}, padding_mode="
                f"{mod.padding_mode!r}; LoGra's hooks support groups=1 with zero padding"
            )
        weight = params[w_key]
        d_out, d_in = weight.shape[0], weight[0].numel()
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7_919 * i)
        p_in = random_projection(proj_dim_in, d_in + int(bias), kind, gen)
        p_out = random_projection(proj_dim_out, d_out, kind, gen)
        dt, dev = weight.dtype, weight.device
        layers.append(LayerProjection(name, mod, p_in.to(dev, dt), p_out.to(dev, dt), bias))
    return layers


def _hooked_modules(model: nn.Module, params: dict[str, Tensor]) -> list[tuple[str, nn.Module]]:
    wanted = {k.rsplit(".", 1)[0] if "." in k else "" for k in params}
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and n in wanted
    ]


def _key(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def kronecker_matrix(layer: LayerProjection) -> Tensor:
    """``(k_out·k_in, d_out·(d_in + bias))``: the explicit ``P_out ⊗ P_in`` (tests, tiny layers).

    Acts on the row-major ``vec([W | b])``; see :func:`weight_bias_matrix`.
    """
    return torch.kron(layer.p_out, layer.p_in)


def weight_bias_matrix(grad_w: Tensor, grad_b: Tensor | None) -> Tensor:
    """``(B, d_out, d_in + bias)`` ``[∇W | ∇b]`` from per-example ``(B, d_out, ...)`` gradients."""
    g = grad_w.reshape(grad_w.shape[0], grad_w.shape[1], -1)
    return g if grad_b is None else torch.cat([g, grad_b.reshape(*g.shape[:2], 1)], dim=2)
