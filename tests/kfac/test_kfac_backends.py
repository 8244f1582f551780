"""(E)K-FAC end to end: the ``hooks`` and ``curvlinops`` back-ends through the Hessians (float64).

``backend: hooks`` and ``backend: curvlinops`` give the same curvature, solves and influence
scores (toy tasks and a tiny float64 DDPM); the info/manifest records the back-end; a grouped
Conv2d falls back to curvlinops and says so. Their factors agree to ~1e-14
(``test_kfac_factors.py``); ``E2E_RTOL`` below also covers float64 eigendecompositions.
"""

from __future__ import annotations

import math

import pytest
import torch
from attribution_kfac.kfac import EKFACHessian, KFACHessian
from kfac_toys import fit

from attribution_core.errors import ConfigError
from attribution_core.gradients import gradient_chunks, select_parameters, stack_gradients
from attribution_core.interfaces import FitInputs

pytest.importorskip("curvlinops")


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


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match=r"hessian 'kfac'.*backend.*'hooks' or 'curvlinops'"):
        KFACHessian(backend="nope")


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
    inputs = FitInputs(model=model, task=task, train_function=fn, seed=0, params=params)
    curvs = {
        backend: cls(damping=1e-4, backend=backend).fit(inputs)
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
