"""The fitted Kronecker-factored curvature and its damped solve ``(H + λI)⁻¹ G``.

Per layer with weight ``W: (d_out, d_in)`` (Conv2d: ``d_in = c_in/groups · kh · kw``) and bias
``b: (d_out,)``, a gradient block is the matrix ``V = [W | b]`` (joint blocks) or ``W`` and ``b``
separately. In the Kronecker eigenbasis ``Q_G ⊗ Q_A``

    H_layer = s · (Q_G ⊗ Q_A) diag(E) (Q_G ⊗ Q_A)ᵀ,

with ``E = λ_G λ_Aᵀ`` for K-FAC and the corrected eigenvalues for EK-FAC (``s`` = the task's
``CurvatureProblem.scale``). The exact damped inverse is then

    (H_layer + λ I)⁻¹ V = Q_G [(Q_Gᵀ V Q_A) / (s·E + λ)] Q_Aᵀ,

computed in float64. A separate bias block is the same with ``Q_A = [1]`` (``E = λ_G``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attribution_core import Curvature, NumericalError


@dataclass(frozen=True)
class Block:
    """One Linear/Conv2d layer's slice of the flat parameter vector.

    Attributes:
        layer: module name in the curvature problem's model (used for factor keys).
        label: parameter-name prefix in the task model (used in messages).
        weight: ``(offset, d_out, d_in)`` of the weight in the flat vector, or None.
        bias: ``(offset, d_out)`` of the bias, or None.
        joint: weight and bias share one Kronecker block (``[W | b]``).
    """

    layer: str
    label: str
    weight: tuple[int, int, int] | None
    bias: tuple[int, int] | None
    joint: bool


def _rotate(V: Tensor, QG: Tensor, QA: Tensor | None) -> Tensor:
    """``Q_Gᵀ V Q_A`` for ``V: (n, d_out, d_a)`` (or ``(n, d_out)`` when ``QA`` is None)."""
    if QA is None:
        return V @ QG
    return QG.T @ V @ QA


def _unrotate(V: Tensor, QG: Tensor, QA: Tensor | None) -> Tensor:
    """``Q_G V Q_Aᵀ`` (inverse of :func:`_rotate`)."""
    if QA is None:
        return V @ QG.T
    return QG @ V @ QA.T


class KroneckerCurvature(Curvature):
    """``solve(G) = (s·K + λ_tot I)⁻¹ G`` block by block, float64 internally.

    Args:
        blocks: the layers, in any order, covering every flat coordinate.
        factors: float64 tensors keyed ``"<layer>|QA"``, ``"|QG"``, ``"|E"`` (weight or joint
            eigenvalues ``(d_out, d_a)``), ``"|E_bias"`` (separate bias, ``(d_out,)``) and, for
            K-FAC, ``"|lam_a"``/``"|lam_g"`` (factor eigenvalues, for factored damping).
        scale: ``s`` of the curvature problem.
        damping: λ chosen by the user, already resolved to absolute units.
        l2: the task's ``l2``; ``2·l2`` (``∇²R``) is added to the damping.
        n_params: ``p``.
        damping_kind: ``"exact"`` or ``"factored"`` (K-FAC only).
        info: facts for ``describe()``.

    Raises:
        NumericalError: total damping 0 and a layer's curvature is singular.
    """

    def __init__(
        self,
        blocks: list[Block],
        factors: dict[str, Tensor],
        *,
        scale: float,
        damping: float,
        l2: float,
        n_params: int,
        damping_kind: str = "exact",
        info: dict[str, Any] | None = None,
    ) -> None:
        self.blocks = blocks
        self.factors = factors
        self.scale = float(scale)
        self.damping = float(damping)
        self.total_damping = float(damping) + 2.0 * float(l2)
        self.n_params = n_params
        self.damping_kind = damping_kind
        self.info = dict(info or {})
        self._inverse: dict[str, Tensor] = {}
        for block in blocks:
            self._prepare(block)

    # ---- set-up --------------------------------------------------------------------------
    def _eigenvalues(self, block: Block, which: str) -> Tensor:
        """``s·E`` for the weight/joint (``which="E"``) or separate bias (``"E_bias"``)."""
        return self.scale * self.factors[f"{block.layer}|{which}"].clamp_min(0.0)

    def _prepare(self, block: Block) -> None:
        lam = self.total_damping
        parts = []
        if block.weight is not None:
            parts.append("E")
        if block.bias is not None and not block.joint:
            parts.append("E_bias")
        for which in parts:
            if self.damping_kind == "factored":
                inv = self._factored_inverse(block, which)
            else:
                sE = self._eigenvalues(block, which)
                if lam == 0.0:
                    self._check_regular(block, which, sE)
                inv = 1.0 / (sE + lam)
            self._inverse[f"{block.layer}|{which}"] = inv

    def _factored_inverse(self, block: Block, which: str) -> Tensor:
        """``1 / ((√s·λ_G + √λ)(√s·λ_A + √λ))`` (bias: ``λ_A = 1``)."""
        root_s, root_l = math.sqrt(self.scale), math.sqrt(self.total_damping)
        lam_g = self.factors[f"{block.layer}|lam_g"].clamp_min(0.0)
        if which == "E":
            lam_a = self.factors[f"{block.layer}|lam_a"].clamp_min(0.0)
        else:
            lam_a = torch.ones(1, dtype=lam_g.dtype, device=lam_g.device)
        denom = torch.outer(root_s * lam_g + root_l, root_s * lam_a + root_l)
        if self.total_damping == 0.0:
            self._check_regular(block, which, denom)
        out = 1.0 / denom
        return out if which == "E" else out[:, 0]

    def _check_regular(self, block: Block, which: str, values: Tensor) -> None:
        top = float(values.max()) if values.numel() else 0.0
        low = float(values.min()) if values.numel() else 0.0
        tol = max(values.shape) * torch.finfo(torch.float32).eps * top
        if top <= 0.0 or low <= tol:
            what = "bias block" if which == "E_bias" else "Kronecker factors"
            raise NumericalError(
                f"damping: 0 (with task l2 = 0) but layer {block.label!r} has singular "
                f"{what} (smallest eigenvalue {low:.3e}, largest {top:.3e}); set damping > 0 "
                f"(e.g. 1e-8) or damping_mode: relative"
            )

    # ---- API -----------------------------------------------------------------------------
    def solve(self, gradients: Tensor) -> Tensor:
        """``(n, p) -> (n, p)``: ``(H + λ_tot I)⁻¹`` applied to every row (float64 inside).

        Memory: the output has the input's dtype; only one block's slice of the rows is held
        in float64 at a time (peak ≈ input + output + one block), not a float64 copy of all
        of ``gradients``. Each block's arithmetic is the same float64 computation either way.
        """
        if gradients.ndim != 2 or gradients.shape[1] != self.n_params:
            raise ValueError(
                f"gradients mismatch: expected (n, {self.n_params}), got {tuple(gradients.shape)}."
            )
        G = gradients
        out = torch.zeros_like(G)
        n = G.shape[0]
        f64 = torch.float64
        for block in self.blocks:
            key = block.layer
            QG = self.factors[f"{key}|QG"]
            if block.weight is not None:
                w_off, d_out, d_in = block.weight
                QA = self.factors[f"{key}|QA"]
                V = G[:, w_off : w_off + d_out * d_in].to(f64).reshape(n, d_out, d_in)
                if block.joint:
                    b_off = block.bias[0]
                    b = G[:, b_off : b_off + d_out].to(f64).unsqueeze(-1)
                    V = torch.cat([V, b], dim=-1)
                V = _unrotate(_rotate(V, QG, QA) * self._inverse[f"{key}|E"], QG, QA)
                out[:, w_off : w_off + d_out * d_in] = V[..., :d_in].reshape(n, -1)
                if block.joint:
                    out[:, b_off : b_off + d_out] = V[..., d_in]
                del V
            if block.bias is not None and not block.joint:
                b_off, d_out = block.bias
                V = G[:, b_off : b_off + d_out].to(f64)
                V = _unrotate(_rotate(V, QG, None) * self._inverse[f"{key}|E_bias"], QG, None)
                out[:, b_off : b_off + d_out] = V
        return out

    def dense(self) -> Tensor:
        """The undamped approximation ``s·K`` as a dense ``(p, p)`` float64 matrix (tests)."""
        p = self.n_params
        H = torch.zeros(p, p, dtype=torch.float64, device=next(iter(self.factors.values())).device)
        for block in self.blocks:
            QG = self.factors[f"{block.layer}|QG"]
            idx: list[Tensor] = []
            mats: list[Tensor] = []
            if block.weight is not None:
                w_off, d_out, d_in = block.weight
                QA = self.factors[f"{block.layer}|QA"]
                E = self._eigenvalues(block, "E")
                basis = torch.kron(QG, QA)  # rows: (out, in) row-major = our flat order
                coords = torch.arange(w_off, w_off + d_out * d_in).reshape(d_out, d_in)
                if block.joint:
                    b_off = block.bias[0]
                    bias_col = torch.arange(b_off, b_off + d_out).unsqueeze(-1)
                    coords = torch.cat([coords, bias_col], dim=-1)
                idx.append(coords.reshape(-1))
                mats.append(basis @ torch.diag(E.reshape(-1)) @ basis.T)
            if block.bias is not None and not block.joint:
                b_off, d_out = block.bias
                idx.append(torch.arange(b_off, b_off + d_out))
                E = self._eigenvalues(block, "E_bias")
                mats.append(QG @ torch.diag(E) @ QG.T)
            for coords, M in zip(idx, mats, strict=True):
                H[coords[:, None], coords[None, :]] = M
        return H

    def trace(self) -> float:
        """``tr(s·K)`` (undamped)."""
        return kronecker_trace(self.blocks, self.factors, self.scale)

    def describe(self) -> dict[str, Any]:
        """Damping used (user λ, total with 2·l2), scale, layers and fit facts."""
        return {
            "damping": self.damping,
            "total_damping": self.total_damping,
            "damping_kind": self.damping_kind,
            "scale": self.scale,
            "n_params": self.n_params,
            "layers": [b.label for b in self.blocks],
            **self.info,
        }


def kronecker_trace(blocks: list[Block], factors: dict[str, Tensor], scale: float) -> float:
    """``tr(s·K) = s · Σ_layers Σ E`` (eigenvalues clamped at 0, as in the solve)."""
    total = 0.0
    for block in blocks:
        if block.weight is not None:
            total += float(factors[f"{block.layer}|E"].clamp_min(0.0).sum())
        if block.bias is not None and not block.joint:
            total += float(factors[f"{block.layer}|E_bias"].clamp_min(0.0).sum())
    return scale * total
