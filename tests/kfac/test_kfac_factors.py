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
* End to end through :class:`KFACHessian` / :class:`EKFACHessian`: ``backend: hooks`` and
  ``backend: curvlinops`` give the same curvature, solves and influence scores (toy tasks and a
  tiny float64 DDPM); the info/manifest records the back-end; a grouped Conv2d falls back to
  curvlinops and says so.

Tolerance for factors and corrections: relative 1e-12 of the largest entry of curvlinops'
tensor. Both sides draw identical pseudo-targets (same generator, same order: bit-identical
forward outputs) and sum the same float64 products in a different order (Toeplitz blocks vs
unfolded patches, per-call vs per-layer accumulation), so they differ by round-off,
~ n·2⁻⁵³ ≈ 1e-14 relative for the ≤ a few hundred terms here; a wrong scale (1/N, 1/m, √C),
layout ([W | b], channel order) or pseudo-target is an O(1) relative error.
The end-to-end tolerance (``E2E_RTOL``, below) also covers float64 eigendecompositions.
"""

from __future__ import annotations

import math

import pytest
import torch
from attribution_kfac.factors import FactorPasses, Layer
from attribution_kfac.kfac import EKFACHessian, KFACHessian
from kfac_toys import fit
from torch import nn

from attribution_core.gradients import gradient_chunks, select_parameters, stack_gradients

cl = pytest.importorskip("curvlinops")

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


def _operator(cls, model, loss_func, params, data, fisher, mc, approx, separate):
    return cls(
        model,
        loss_func,
        params,
        data,
        check_deterministic=False,
        seed=SEED,
        fisher_type=fisher,
        mc_samples=mc,
        kfac_approx=approx,
        num_per_example_loss_terms=1,
        separate_weight_and_bias=separate,
        num_data=N,
        batch_size_fn=_size,
    )


def _passes(model, loss_func, layers, data, fisher, mc, approx, separate) -> FactorPasses:
    return FactorPasses(
        model,
        loss_func,
        layers,
        data,
        fisher=fisher,
        mc_samples=mc,
        approx=approx,
        joint=not separate,
        n_data=N,
        seed=SEED,
        device=torch.device("cpu"),
    )


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert scale > 0, f"{what}: curvlinops' tensor is zero (a vacuous comparison)"
    assert err <= RTOL * scale, f"{what}: max error {err:.3e}, max entry {scale:.3e}"


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
    op = _operator(cl.KFACLinearOperator, model, loss_func, params, data, fisher, mc, approx,
                   separate)  # fmt: skip
    op.compute_kronecker_factors()
    A, G = _passes(model, loss_func, layers, data, fisher, mc, approx, separate).kronecker_factors()
    assert set(G) == set(op._gradient_covariances) == {layer.name for layer in layers}
    assert set(A) == set(op._input_covariances)
    for name, want in op._input_covariances.items():
        _close(A[name], want, f"A of {name}")
    for name, want in op._gradient_covariances.items():
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
    op = _operator(cl.EKFACLinearOperator, model, loss_func, params, data, fisher, mc, "expand",
                   separate)  # fmt: skip
    op._input_covariances_eigenvectors.update(QA)  # curvlinops rotates with what it finds here
    op._gradient_covariances_eigenvectors.update(QG)
    op.compute_eigenvalue_correction()
    passes = _passes(model, loss_func, layers, data, fisher, mc, "expand", separate)
    got = passes.eigenvalue_correction(QA, QG)
    assert set(got) == set(op._corrected_eigenvalues)
    for layer in layers:
        want = op._corrected_eigenvalues[layer.name]
        if isinstance(want, torch.Tensor):  # [W | b] joint
            assert set(got[layer.name]) == {"joint"}
            _close(got[layer.name]["joint"], want, f"E of {layer.name}")
            continue
        pos = op._mapping[layer.name]
        assert set(got[layer.name]) == set(pos)
        for part, i in pos.items():
            _close(got[layer.name][part], want[i], f"E of {layer.name}.{part}")


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
            passes = _passes(model, loss_func, layers, data, "mc", mc, "expand", True)
            passes.eigenvalue_correction(QA, QG)
            counts[mc] = len(calls)
        assert counts[1] == len(data) * sum(layer.weight for layer in layers)
        if name == "mlp":
            assert counts[3] == counts[1], counts
        else:
            assert counts[1] < counts[3] < 3 * counts[1], counts


# ---- end to end through the Hessian ------------------------------------------------------------
# Through ``fit`` the factors (equal to ~1e-14, above) go through float64 ``eigh`` and the damped
# inverse: eigenvectors move by round-off / eigen-gap and the solve amplifies by up to
# ‖H‖/λ, so curvature, solves and scores agree to ~1e-15..1e-13 relative here (measured);
# 1e-10 (relative Frobenius norm) leaves that margin and still catches any real difference —
# another MC seed alone changes the DDPM solves by O(1).
E2E_RTOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("cls", [KFACHessian, EKFACHessian])
@pytest.mark.parametrize(
    "task_name,options",
    [
        ("conv_task", {"fisher": "mc", "mc_samples": 2}),
        ("conv_task", {"fisher": "type-2", "separate_weight_and_bias": False}),
        ("mlp_task", {"fisher": "mc", "approx": "reduce"}),
        ("mlp_task", {"fisher": "empirical"}),
    ],
)
def test_backends_agree_through_the_hessian(request, cls, task_name, options):
    task = request.getfixturevalue(task_name)
    model, _, hooks = fit(cls(damping=1e-3, backend="hooks", **options), task)
    _, _, ref = fit(cls(damping=1e-3, backend="curvlinops", **options), task, model=model)
    assert hooks.describe()["backend"] == "hooks"
    assert ref.describe()["backend"] == "curvlinops"
    assert _rel(hooks.dense(), ref.dense()) < E2E_RTOL
    G = torch.randn(5, hooks.n_params, generator=torch.Generator().manual_seed(0)).double()
    assert _rel(hooks.solve(G), ref.solve(G)) < E2E_RTOL


@pytest.mark.parametrize("cls", [KFACHessian, EKFACHessian])
def test_grouped_conv_falls_back_to_curvlinops(grouped_conv_task, cls):
    task = grouped_conv_task
    model, _, got = fit(cls(damping=1e-3, backend="hooks"), task)
    _, _, ref = fit(cls(damping=1e-3, backend="curvlinops"), task, model=model)
    assert got.describe()["backend"] == "curvlinops"
    assert torch.equal(got.dense(), ref.dense())  # the same code path: the same bits


def test_unknown_backend_is_a_config_error(conv_task):
    from attribution_core.errors import ConfigError

    with pytest.raises(ConfigError, match="hooks, curvlinops"):
        fit(KFACHessian(backend="nope"), conv_task)


@pytest.fixture(scope="module")
def ddpm64():
    """An untrained width-8 U-Net on 12 digits, float64 (curvature is tested at any θ)."""
    from attribution_core import get_registry

    if "ddpm-digits" not in get_registry().names("task"):
        pytest.skip("the diffusion plugin (task ddpm-digits) is not installed")
    from attribution_diffusion.task import DDPMDigitsTask

    task = DDPMDigitsTask(dtype=torch.float64, n_train=12, width=8, n_samples=2, T=50)
    model = task.build_model(0)
    params, _ = select_parameters(model)
    fn = task.training_loss(2)
    G = stack_gradients(gradient_chunks(model, fn, task.train_data(), params, seed=0))
    return task, model, params, fn, G


@pytest.mark.parametrize("cls", [KFACHessian, EKFACHessian])
def test_ddpm_backends_give_the_same_scores(ddpm64, cls):
    task, model, params, fn, G = ddpm64
    curvs = {
        backend: cls(damping=1e-4, backend=backend).fit(
            model, task, fn, 0, params=params, train_gradients=None
        )
        for backend in ("hooks", "curvlinops")
    }
    assert {b: c.describe()["backend"] for b, c in curvs.items()} == {
        "hooks": "hooks",
        "curvlinops": "curvlinops",
    }
    q = {b: c.solve(G[:3]) for b, c in curvs.items()}
    assert _rel(q["hooks"], q["curvlinops"]) < E2E_RTOL
    scores = {b: G @ x.T for b, x in q.items()}  # (n_train, 3) influence scores
    assert _rel(scores["hooks"], scores["curvlinops"]) < E2E_RTOL
    assert math.isfinite(scores["hooks"].sum().item())


def test_manifest_records_the_backend(tmp_path):
    """Through ``attribute()``: manifest.json names the back-end that fitted the factors."""
    import json

    from attribution_core import attribute

    cfg = {
        "task": {"name": "digits-classifier", "n_train": 40, "hidden": 8, "steps": 10},
        "methods": [
            {"name": "ekfac-influence", "label": "hooks"},  # the default back-end
            {"name": "ekfac-influence", "label": "curvlinops", "backend": "curvlinops"},
        ],
        "queries": {"count": 2},
    }
    res = attribute(cfg, out=tmp_path)
    for label in ("hooks", "curvlinops"):
        manifest = json.loads((tmp_path / label / "manifest.json").read_text())
        assert manifest["info"]["curvature"]["backend"] == label
    # float32 task, int8 queries: the same scores up to float32 round-off of H⁻¹g (~1e-6
    # relative) and the rare int8 rounding step it may flip
    a, b = (torch.from_numpy(res.scores[k]).double() for k in ("hooks", "curvlinops"))
    assert _rel(a, b) < 1e-4
