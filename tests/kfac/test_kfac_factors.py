"""The ``hooks`` back-end (``attribution_kfac.factors``) against curvlinops 3.0 itself (float64).

* Kronecker factors ``A`` and ``G`` of :class:`FactorPasses` equal those of
  ``curvlinops.KFACLinearOperator.compute_kronecker_factors`` — called as the ``kfac`` Hessian
  calls it (``num_per_example_loss_terms=1``, ``num_data=N``, the same seed) — for every Fisher
  type (mc with 1 and 3 samples, empirical, type-2, forward-only), expand / reduce, separate /
  joint weight and bias, and MSE / cross-entropy / BCE losses with sum and mean reductions, on
  small models with Linear and Conv2d layers: an MLP, a CNN (padding, stride 2, dilation,
  non-square kernel, an in-place ReLU after a conv), a weight-shared Linear on 3-D inputs, and a
  DDPM-like dict-input conv net whose 2-D output is the flattened image (with an in-place
  ``h += temb`` on a conv output, as residual code does; both in-place cases once gave the
  hooks the gradient of the *modified* tensor), and (K-FAC only) a Linear called twice.
* EK-FAC eigenvalue corrections equal ``EKFACLinearOperator.compute_eigenvalue_correction`` in
  the same (random orthogonal) eigenbases, injected into both.
* End to end through the Hessians: ``tests/kfac/test_kfac_backends.py``.

Tolerance for factors and corrections: relative 1e-12 of the largest entry of curvlinops'
tensor. Both sides draw identical pseudo-targets (per loss row, ``attribution_kfac.draws``:
the adapter installs the same per-row generators into curvlinops' ``draw_label``; bit-identical
forward outputs) and sum the same float64 products in a different order (Toeplitz blocks vs
unfolded patches, per-call vs per-layer accumulation), so they differ by round-off,
~ n·2⁻⁵³ ≈ 1e-14 relative for the ≤ a few hundred terms here; a wrong scale (1/N, 1/m, √C),
layout ([W | b], channel order) or pseudo-target is an O(1) relative error.
"""

from __future__ import annotations

import pytest
import torch
from attribution_kfac import curvlinops_adapter
from attribution_kfac.factors import FactorPasses, Layer
from attribution_kfac.options import KFACOptions
from torch import nn

from attribution_core import CurvatureProblem
from attribution_core.testing import allclose_report

pytest.importorskip("curvlinops")

RTOL = 1e-12
N, BATCH, SEED = 10, 4, 1234  # batches of 4, 4, 2: the mean-reduction correction varies


# ---- models ------------------------------------------------------------------------------------
class Shared(nn.Module):
    """A Linear applied to every one of T = 4 positions of a ``(B, 4, 3)`` input, flattened."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x))).flatten(1)  # (B, 8)


class TinyEps(nn.Module):
    """DDPM-like: ``{"x_t", "t"} -> ε(x_t, t).reshape(B, H·W)`` with an in-place time bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(1, 3, 3, padding=1)
        self.temb = nn.Linear(2, 3)
        self.conv_out = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, inp: dict) -> torch.Tensor:
        t = inp["t"].to(inp["x_t"].dtype)[:, None] / 10
        h = self.conv_in(inp["x_t"])
        h += self.temb(torch.cat([t.sin(), t.cos()], 1))[:, :, None, None]  # in-place on an output
        out = self.conv_out(nn.functional.silu(h))
        return out.reshape(out.shape[0], -1)  # (B, 20)


class Twice(nn.Module):
    """One Linear called twice per forward (K-FAC accumulates over calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),  # modifies the conv's output in place
        nn.Conv2d(3, 2, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 2, 3),
    )


MODELS = {  # name -> (model factory, input shape per row, n_out)
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), (4,), 3),
    "cnn": (_cnn, (2, 6, 5), 3),
    "shared": (Shared, (4, 3), 8),
    "ddpm": (TinyEps, None, 20),
    "twice": (Twice, (4,), 3),
}


def _problem(model_name: str, loss_name: str, partial: bool = False):
    """``(model, loss_func, params, layers, data)`` with ``data`` a list of ``(X, y)``."""
    make, shape, k = MODELS[model_name]
    torch.manual_seed(0)
    model = make().double()
    gen = torch.Generator().manual_seed(7)
    if shape is None:  # dict inputs, 4×5 images
        x = torch.randn(N, 1, 4, 5, generator=gen, dtype=torch.float64)
        t = torch.randint(1, 50, (N,), generator=gen)
        X = [{"x_t": x[i : i + BATCH], "t": t[i : i + BATCH]} for i in range(0, N, BATCH)]
    else:
        x = torch.randn(N, *shape, generator=gen, dtype=torch.float64)
        X = [x[i : i + BATCH] for i in range(0, N, BATCH)]
    kind, reduction = loss_name.split("-")
    if kind == "mse":
        loss_func, y = nn.MSELoss(reduction=reduction), torch.randn(N, k, generator=gen).double()
    elif kind == "ce":
        loss_func, y = nn.CrossEntropyLoss(reduction=reduction), torch.randint(0, k, (N,))
    else:
        loss_func = nn.BCEWithLogitsLoss(reduction=reduction)
        y = torch.randint(0, 2, (N, k), generator=gen).double()
    data = [(Xb, y[i * BATCH : (i + 1) * BATCH]) for i, Xb in enumerate(X)]
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    params, layers = [], []
    for i, (name, mod) in enumerate(modules):
        # partial: the first layer without its bias, the last without its weight
        w = not (partial and i == len(modules) - 1)
        b = mod.bias is not None and not (partial and i == 0)
        params += ([mod.weight] if w else []) + ([mod.bias] if b else [])
        layers.append(Layer(name, mod, w, b))
    return model, loss_func, params, layers, data


def _size(X) -> int:
    return X["x_t"].shape[0] if isinstance(X, dict) else X.shape[0]


def _options(fisher, mc, approx, separate) -> KFACOptions:
    return KFACOptions(
        fisher=fisher, mc_samples=mc, approx=approx, separate_weight_and_bias=separate
    )


def _operator(ekfac, model, loss_func, params, data, fisher, mc, approx, separate):
    """curvlinops' operator, built as the ``curvlinops`` back-end builds it (the adapter)."""
    problem = CurvatureProblem(
        model, loss_func, lambda index: data, scale=1.0, batch_size_fn=_size, n_rows=N
    )
    options = _options(fisher, mc, approx, separate)
    return curvlinops_adapter.kronecker_operator(
        problem, params, data, options, ekfac=ekfac, seed=SEED
    )


def _passes(model, loss_func, layers, fisher, mc, approx, separate) -> FactorPasses:
    return FactorPasses(
        model,
        loss_func,
        layers,
        _options(fisher, mc, approx, separate),
        n_data=N,
        seed=SEED,
        device=torch.device("cpu"),
    )


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """``got ≈ want`` to ``RTOL`` of ``want``'s largest entry (the report names the worst)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    scale = want.abs().max().item()
    assert scale > 0, f"{what}: curvlinops' tensor is zero (a vacuous comparison)"
    report = allclose_report(got, want, rtol=0.0, atol=RTOL * scale)
    assert not report, f"{what}: {report}"


# ---- Kronecker factors -------------------------------------------------------------------------
CASES = [
    ("mlp", "mse-sum", False),
    ("mlp", "ce-mean", False),
    ("mlp", "bce-sum", False),
    ("mlp", "mse-mean", True),
    ("cnn", "mse-mean", False),
    ("cnn", "ce-sum", False),
    ("shared", "mse-sum", False),
    ("shared", "ce-mean", False),
    ("ddpm", "mse-sum", False),
    ("ddpm", "mse-mean", True),
]
# K-FAC only: for a module called twice curvlinops' EK-FAC pairs every call's output gradient
# with the last call's input (one cached activation per module), the hooks with each call's own
KFAC_CASES = [*CASES, ("twice", "mse-mean", False), ("twice", "ce-sum", False)]
FISHERS = [("mc", 1), ("mc", 3), ("empirical", 1), ("type-2", 1), ("forward-only", 1)]


def _case_id(case) -> str:
    return f"{case[0]}-{case[1]}" + ("-partial" if case[2] else "")


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher,mc", FISHERS, ids=[f"{f}{m}" for f, m in FISHERS])
@pytest.mark.parametrize("case", KFAC_CASES, ids=_case_id)
def test_kronecker_factors_equal_curvlinops(case, fisher, mc, approx, separate):
    model, loss_func, params, layers, data = _problem(*case)
    op = _operator(False, model, loss_func, params, data, fisher, mc, approx, separate)
    want_A, want_G = curvlinops_adapter.kronecker_factors(op)
    passes = _passes(model, loss_func, layers, fisher, mc, approx, separate)
    A, G = passes.kronecker_factors(data)
    assert set(G) == set(want_G) == {layer.name for layer in layers}
    assert set(A) == set(want_A)
    for name, want in want_A.items():
        _close(A[name], want, f"A of {name}")
    for name, want in want_G.items():
        _close(G[name], want, f"G of {name}")


# ---- EK-FAC eigenvalue correction --------------------------------------------------------------
def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return Q


def _bases(layers, separate: bool):
    """Random orthogonal ``Q_A`` (weight layers; ``[W | b]``-sized when joint) and ``Q_G``."""
    gen = torch.Generator().manual_seed(3)
    QA, QG = {}, {}
    for layer in layers:
        mod = layer.module
        d_out = mod.weight.shape[0]
        QG[layer.name] = _orthogonal(d_out, gen)
        if layer.weight:
            joint = not separate and layer.bias
            QA[layer.name] = _orthogonal(mod.weight[0].numel() + int(joint), gen)
    return QA, QG


EK_FISHERS = FISHERS[:4]


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("fisher,mc", EK_FISHERS, ids=[f"{f}{m}" for f, m in EK_FISHERS])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_eigenvalue_correction_equals_curvlinops(case, fisher, mc, separate):
    model, loss_func, params, layers, data = _problem(*case)
    QA, QG = _bases(layers, separate)
    op = _operator(True, model, loss_func, params, data, fisher, mc, "expand", separate)
    # curvlinops rotates with the eigenbases the adapter injects (no factor pass of its own)
    want = curvlinops_adapter.corrected_eigenvalues(op, data, QA, QG)
    passes = _passes(model, loss_func, layers, fisher, mc, "expand", separate)
    got = passes.eigenvalue_correction(data, QA, QG)
    assert set(got) == set(want) == {layer.name for layer in layers}
    for layer in layers:
        parts = {"joint"} if not separate and layer.weight and layer.bias else set()
        parts = parts or {p for p, on in (("weight", layer.weight), ("bias", layer.bias)) if on}
        assert set(got[layer.name]) == set(want[layer.name]) == parts
        for part, value in want[layer.name].items():
            _close(got[layer.name][part], value, f"E of {layer.name}.{part}")


def test_correction_rotates_each_input_once_for_several_mc_samples(monkeypatch):
    """With 3 pseudo-targets per forward pass inputs rotated into ``Q_A`` are kept per batch.

    The values are checked against curvlinops (``mc3`` above); this checks that the reuse
    happens. MLP (``L = 1``): every layer keeps its rotated inputs, so the inputs are gathered
    once per batch and layer whatever the number of samples. DDPM-like net: its convolutions
    that rotate the inputs first keep them; those that rotate the per-row gradient instead
    (cheaper there) gather their patches per sample, so the count lies strictly in between.
    """
    import attribution_kfac.rotation as rotation

    orig = rotation.rows_positions_in
    calls: list[int] = []

    def counting(mod, x):
        calls.append(id(x))
        return orig(mod, x)

    monkeypatch.setattr(rotation, "rows_positions_in", counting)
    for name in ("mlp", "ddpm"):
        model, loss_func, _, layers, data = _problem(name, "mse-sum")
        QA, QG = _bases(layers, separate=True)
        counts = {}
        for mc in (1, 3):
            calls.clear()
            passes = _passes(model, loss_func, layers, "mc", mc, "expand", True)
            passes.eigenvalue_correction(data, QA, QG)
            counts[mc] = len(calls)
        assert counts[1] == len(data) * sum(layer.weight for layer in layers)
        if name == "mlp":
            assert counts[3] == counts[1], counts
        else:
            assert counts[1] < counts[3] < 3 * counts[1], counts
