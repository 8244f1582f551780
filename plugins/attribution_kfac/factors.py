"""K-FAC / EK-FAC factors from our own hooks, in curvlinops 3.0's conventions (the fast back-end).

Computes what ``curvlinops.KFACLinearOperator.compute_kronecker_factors`` and
``EKFACLinearOperator.compute_eigenvalue_correction`` compute — the same pseudo-targets (seeded
per loss row, :mod:`attribution_kfac.draws`, which the adapter installs into curvlinops too), the
same scaling (``A`` divided by ``N·L`` under expand, ``G`` and the corrected eigenvalues by the
number of MC samples), the same ``[W | b]`` layout — so the factors agree to float round-off
(``tests/kfac/test_kfac_factors.py`` compares them). What differs is the work done per pass:

* The backward pass asks autograd for the gradients w.r.t. the layer *outputs* only
  (``torch.autograd.grad(loss, outputs)``), never for the parameters: no weight-gradient GEMMs.
* Conv2d input covariances use :func:`attribution_kfac.patches.conv_input_covariance` (Toeplitz
  blocks for stride 1; no ``unfold`` → ``rearrange`` → ``einsum`` copies).
* EK-FAC's per-row gradients come from one ``bmm`` of the output gradients and a channels-last
  patch matrix; the eigenbasis rotation is applied on the cheaper side
  (:mod:`attribution_kfac.rotation`), and with several MC pseudo-targets per forward pass the
  inputs rotated into ``Q_A`` are kept for the batch instead of being rotated per sample.

Supported: ``nn.Linear`` and ``nn.Conv2d`` (groups 1, zero padding) with one input each; losses
MSE / cross-entropy / BCE-with-logits; Fisher ``mc`` / ``empirical`` / ``type-2`` /
``forward-only``; ``expand`` and ``reduce``. :func:`unsupported` names anything else, and the
caller then uses curvlinops itself.

Output gradients are taken at each layer output's autograd edge, recorded in the forward hook,
so an in-place op on the output (``ReLU(inplace=True)``, ``h += skip``) does not change them
(curvlinops' tensor hooks see the same gradient). A module called several times per forward
accumulates ``A`` / ``G`` over calls, as curvlinops does; its EK-FAC correction squares each
call's gradient separately with that call's input (curvlinops pairs every call with the last
call's input: the two differ there, and only there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from attribution_kfac import curvlinops_adapter, rotation
from attribution_kfac.draws import PseudoTargets
from attribution_kfac.options import KFACOptions
from attribution_kfac.patches import (
    cl_order,
    conv_geometry,
    conv_input_covariance,
    patch_sum,
    reduce_patches,
)

LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)


@dataclass(frozen=True)
class Layer:
    """One hooked module: its name, and whether its weight / bias are in the curvature."""

    name: str
    module: nn.Module
    weight: bool
    bias: bool


def unsupported(layers: list[Layer], loss_func: nn.Module) -> str | None:
    """Why the fast back-end cannot take this problem (None: it can)."""
    if not isinstance(loss_func, LOSSES):
        return f"loss {type(loss_func).__name__}"
    for layer in layers:
        mod = layer.module
        if isinstance(mod, nn.Conv2d) and conv_geometry(mod) is None:
            return f"layer {layer.name!r} (grouped or non-zero-padded Conv2d)"
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            return f"layer {layer.name!r} ({type(mod).__name__})"
    return None


class FactorPasses:
    """The hooks that run the data passes of one (E)K-FAC fit; each pass gets its own data.

    Args:
        model: maps ``X`` (a tensor or a dict the model understands) to outputs.
        loss_func: ``MSELoss`` / ``CrossEntropyLoss`` / ``BCEWithLogitsLoss`` (sum or mean).
        layers: the hooked Linear/Conv2d modules.
        options: ``fisher`` (``mc`` | ``empirical`` | ``type-2`` | ``forward-only``),
            ``mc_samples`` (pseudo-targets per row, ``mc`` only), ``approx`` (``expand`` |
            ``reduce``) and ``separate_weight_and_bias`` (False: ``[W | b]`` in one block for
            layers with both) are used.
        n_data: ``N`` (loss rows of the whole pass, also when ``data`` is one shard of it: the
            factors of a shard are its share of the whole pass's, so shards sum to it).
        seed: seed of the pseudo-targets (row ``r`` of pass ``p``: :mod:`attribution_kfac.draws`;
            a data object's ``pass_index`` and ``first_row`` give ``p`` and the first ``r``, else 0).
        device: where batches are moved (tensor ``X`` and ``y``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        layers: list[Layer],
        options: KFACOptions,
        *,
        n_data: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.model, self.loss_func, self.layers = model, loss_func, layers
        self.fisher, self.mc_samples = options.fisher, options.mc_samples
        self.approx, self.joint = options.approx, not options.separate_weight_and_bias
        self.n_data, self.seed, self.device = n_data, seed, device
        self._calls: list[tuple[Layer, Tensor | None, GradientEdge | None]] = []  # per call
        self._batch = -1  # index of the batch being processed in the current pass

    # ---- passes --------------------------------------------------------------------------
    def kronecker_factors(
        self, data: Iterable[tuple[Any, Tensor]]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One pass over ``data``: ``(A, G)`` per layer name (``A`` only for layers with a weight).

        ``A: (d_a, d_a)``, ``G: (d_out, d_out)`` in the model's dtype and curvlinops' units.
        """
        A, G = self.kronecker_sums(data)
        self.finish_factors(G)
        return A, G

    def kronecker_sums(
        self, data: Iterable[tuple[Any, Tensor]]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """:meth:`kronecker_factors` before :meth:`finish_factors`: additive over data shards."""
        A: dict[str, Tensor] = {}
        G: dict[str, Tensor] = {}

        def on_input(layer: Layer, x: Tensor) -> None:
            if layer.weight:
                _add(A, layer.name, self._input_covariance(layer, x))

        def on_grad(layer: Layer, x: Tensor, g: Tensor, scale: float) -> None:
            _add(G, layer.name, self._gradient_covariance(layer, g).mul_(scale))

        self._run(data, on_input, on_grad)
        return A, G

    def finish_factors(self, G: dict[str, Tensor]) -> None:
        """``G = I`` per layer for the forward-only Fisher (after the data, not per shard)."""
        if self.fisher == "forward-only":
            for layer in self.layers:
                d_out = _out_features(layer.module)
                G[layer.name] = torch.eye(d_out, dtype=self._dtype(), device=self.device)

    def eigenvalue_correction(
        self, data: Iterable[tuple[Any, Tensor]], QA: dict[str, Tensor], QG: dict[str, Tensor]
    ) -> dict[str, dict[str, Tensor]]:
        """One pass over ``data``: ``Σ_rows (Q_Gᵀ ∇_W ℓ_row Q_A)²`` per layer, in the eigenbases.

        Returns ``{layer: {"joint": (d_out, d_in + 1)}}`` for ``[W | b]`` blocks, else
        ``{layer: {"weight": (d_out, d_in), "bias": (d_out,)}}`` (the parameters present).
        """
        out: dict[str, dict[str, Tensor]] = {}
        bases: dict[str, Tensor] = {}  # Q_A per layer, rows in the order of its inputs' columns
        # with several MC pseudo-targets per forward pass, every backward pass sees the same
        # layer inputs: their rotation into the Q_A basis is kept for the batch (by call)
        memo: dict[int, Tensor] = {}
        memo_batch = [-1]

        def input_basis(layer: Layer, device: torch.device) -> Tensor:
            if layer.name not in bases:
                qa = QA[layer.name]
                if isinstance(layer.module, nn.Conv2d):  # channels-last patches
                    perm = cl_order(conv_geometry(layer.module), device)
                    qa = qa.index_select(
                        0, rotation.cl_rows(perm, joint=qa.shape[0] > perm.numel())
                    )
                bases[layer.name] = qa
            return bases[layer.name]

        def on_grad(layer: Layer, x: Tensor, g: Tensor, scale: float) -> None:
            res = out.setdefault(layer.name, {})
            qg = QG[layer.name]
            g3 = rotation.rows_positions_out(layer.module, g)  # (B, L, d_out) / conv (B, d_out, L)
            if layer.weight:
                if memo_batch[0] != self._batch:
                    memo.clear()
                    memo_batch[0] = self._batch
                key = "joint" if self._joint(layer) else "weight"
                # x is held by self._calls for the whole batch, so its id is unique in it
                reuse = memo if self.fisher == "mc" and self.mc_samples > 1 else None
                a = None  # not needed when its rotation is kept from an earlier MC sample
                if reuse is None or id(x) not in reuse:
                    a = rotation.rows_positions_in(layer.module, x)  # (B, L, D)
                    if key == "joint":
                        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
                qa = input_basis(layer, x.device)
                conv = isinstance(layer.module, nn.Conv2d)
                sq = rotation.corrected_squares(g3, conv, qg, a, qa, reuse, id(x))
                _add(res, key, sq.mul_(scale))
            if layer.bias and not self._joint(layer):
                gs = g3.sum(2 if isinstance(layer.module, nn.Conv2d) else 1)
                _add(res, "bias", (gs @ qg).square_().sum(0).mul_(scale))

        self._run(data, None, on_grad, keep_inputs=True)
        return out

    # ---- the loop ------------------------------------------------------------------------
    def _run(
        self,
        data: Iterable[tuple[Any, Tensor]],
        on_input: Callable[[Layer, Tensor], None] | None,
        on_grad: Callable[[Layer, Tensor, Tensor, float], None],
        keep_inputs: bool = False,
    ) -> None:
        handles = []
        for layer in self.layers:
            handles.append(layer.module.register_forward_hook(self._hook(layer, on_input)))
        self._keep_inputs = keep_inputs
        index, row = getattr(data, "pass_index", 0), getattr(data, "first_row", 0)
        try:
            for batch, (X, y) in enumerate(data):
                self._batch = batch
                if isinstance(X, Tensor):
                    X = X.to(self.device)
                y = y.to(self.device)
                draws = PseudoTargets(self.seed, index, row, y.shape[0])
                row += y.shape[0]
                self._calls = []
                output = self.model(X)
                output, y = _flatten_output(self.loss_func, output, y)
                for grads, scale in self._output_gradients(output, y, draws):
                    for (layer, x, _), g in zip(self._calls, grads, strict=True):
                        if g is not None:
                            on_grad(layer, x, g, scale * self._correction(g.shape[0]))
                self._calls = []
        finally:
            for h in handles:
                h.remove()
            self._calls = []

    def _hook(self, layer: Layer, on_input):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if len(inputs) != 1:
                raise ValueError(f"layer {layer.name!r}: modules with several inputs unsupported")
            x = inputs[0].detach()
            if on_input is not None:
                on_input(layer, x)
            if self.fisher != "forward-only":
                # the gradient edge, not the tensor: an in-place op on the output (ReLU(inplace),
                # ``h += skip``) rebinds the tensor's grad_fn, the edge keeps the layer's own
                edge = get_gradient_edge(output) if output.requires_grad else None
                self._calls.append((layer, x if self._keep_inputs else None, edge))

        return hook

    def _output_gradients(self, output: Tensor, y: Tensor, draws: PseudoTargets):
        """Yield ``(grads of every recorded layer output, scale)`` for each backward pass."""
        if self.fisher == "forward-only":
            return
        edges = [e for _, _, e in self._calls if e is not None]

        def grads(loss: Tensor, retain: bool) -> list[Tensor | None]:
            if not edges:  # no recorded output depends on the parameters
                return [None] * len(self._calls)
            got = iter(torch.autograd.grad(loss, edges, retain_graph=retain, allow_unused=True))
            return [None if e is None else next(got) for _, _, e in self._calls]

        if self.fisher == "mc":
            for i in range(self.mc_samples):
                loss = self._loss(output, draws.draw(self.loss_func, output))
                yield grads(loss, i != self.mc_samples - 1), 1.0 / self.mc_samples
        elif self.fisher == "empirical":
            yield grads(self._loss(output, y), False), 1.0
        elif self.fisher == "type-2":
            loss_hessian_matrix_sqrt = curvlinops_adapter.loss_hessian_sqrt()
            sqrts = torch.stack(
                [
                    loss_hessian_matrix_sqrt(o.detach(), t, self.loss_func)
                    for o, t in zip(output.split(1), y.split(1), strict=True)
                ]
            )
            if self.loss_func.reduction == "mean":
                sqrts.mul_(1.0 / output.shape[0])
            n_cols = sqrts.shape[-1]
            for c in range(n_cols):
                yield grads((output * sqrts[:, :, c]).sum(), c < n_cols - 1), 1.0
        else:
            raise ValueError(
                f"fisher: {self.fisher!r} is not supported; valid: mc, empirical, type-2, "
                f"forward-only"
            )

    def _loss(self, output: Tensor, y: Tensor) -> Tensor:
        loss = self.loss_func(output, y)
        if isinstance(self.loss_func, (nn.BCEWithLogitsLoss, nn.MSELoss)):
            if self.loss_func.reduction == "mean":
                loss = loss * math.sqrt(output.shape[1])
        return loss

    def _correction(self, batch_size: int) -> float:
        """curvlinops' loss-reduction correction of ``G`` (the MC 1/m is applied separately)."""
        if self.loss_func.reduction == "sum":
            return 1.0
        return batch_size**2 / self.n_data  # mean: num_loss_terms² / N (one term per row)

    # ---- per-layer kernels ---------------------------------------------------------------
    def _joint(self, layer: Layer) -> bool:
        return self.joint and layer.weight and layer.bias

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _input_covariance(self, layer: Layer, x: Tensor) -> Tensor:
        """``A`` contribution of one call: ``Σ ããᵀ / (N·L)`` (expand) or ``/ N`` (reduce)."""
        mod, joint = layer.module, self._joint(layer)
        if self.approx == "expand":
            if isinstance(mod, nn.Conv2d):
                geo = conv_geometry(mod)
                cov = conv_input_covariance(x, geo)
                L = math.prod(geo.out_size(*x.shape[-2:]))
                n_rows = x.shape[0] * L
                s = patch_sum(x, geo) if joint else None
            else:
                L = x.shape[1:-1].numel()
                X = x.reshape(-1, x.shape[-1])
                cov, n_rows = X.T @ X, X.shape[0]
                s = X.sum(0) if joint else None
            if joint:
                cov = _bordered(cov, s, float(n_rows))
            return cov.div_(self.n_data * L)
        if isinstance(mod, nn.Conv2d):
            X = reduce_patches(x, conv_geometry(mod))
        else:
            X = x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)
        if joint:
            X = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
        return (X.T @ X).div_(self.n_data)

    def _gradient_covariance(self, layer: Layer, g: Tensor) -> Tensor:
        """``Σ g gᵀ`` over rows (and positions under expand), before scaling."""
        if isinstance(layer.module, nn.Conv2d):
            if self.approx == "reduce":
                g2 = g.sum((2, 3))
            else:
                g2 = g.transpose(0, 1).reshape(g.shape[1], -1).T
        else:
            g2 = g.reshape(-1, g.shape[-1]) if self.approx == "expand" else g
            if self.approx == "reduce" and g.ndim > 2:
                g2 = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        return g2.T @ g2


# ---- helpers -----------------------------------------------------------------------------------
def _add(d: dict, key: str, value: Tensor) -> None:
    if key in d:
        d[key].add_(value)
    else:
        d[key] = value


def _out_features(mod: nn.Module) -> int:
    return mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features


def _bordered(cov: Tensor, s: Tensor, n: float) -> Tensor:
    """``[[cov, s], [sᵀ, n]]``: the covariance of ``[a, 1]``."""
    d = cov.shape[0]
    out = cov.new_empty(d + 1, d + 1)
    out[:d, :d] = cov
    out[:d, d] = s
    out[d, :d] = s
    out[d, d] = n
    return out


def _flatten_output(loss_func: nn.Module, output: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """curvlinops' ``(batch ...) c`` flattening of outputs with more than two dimensions."""
    if isinstance(loss_func, nn.CrossEntropyLoss):
        output = output.movedim(1, -1).reshape(-1, output.shape[1])
        y = y.reshape(-1)
    else:
        output = output.reshape(-1, output.shape[-1])
        y = y.reshape(-1, y.shape[-1])
    return output, y
