"""(E)K-FAC per data shard (issue 20): shard jobs, fixed-order sums, per-example draws.

* Rows: a DDPM curvature problem restricted to a row range yields exactly the rows of the full
  pass there (t, ε seeded per example); the pseudo-targets of a shard equal curvlinops' on the
  same rows (both seeded per loss row).
* Round-off: ``A``, ``G`` and EK-FAC's corrected eigenvalues (in fixed eigenbases) summed over
  4 shards equal one pass to ``RTOL[dtype]`` of the tensor's largest entry — 1e-12 in float64,
  1e-5 in float32. A shard computes the same products as one pass; only the association of the
  sums changes (shard partial sums, other batch boundaries inside a shard), so the error is
  ~ n·ε relative, n ≤ a few hundred terms here (float64 ε ≈ 1.1e-16, float32 ≈ 6e-8).
* Through the Hessian the factors then pass through ``eigh`` and the damped solve, which may
  amplify a round-off perturbation by the eigen-gaps / ‖H‖/λ: the solves of 1 and 4 shards
  agree to ``E2E_RTOL`` (1e-10 float64, as the back-end comparison); through ``attribute()``
  (float32 digits classifier, int8-compressed queries) the scores to 1e-5 relative (Frobenius;
  measured 3.6e-7 for kfac-influence, 3.9e-7 for ekfac-influence).
* Bits: the same 4 shards run twice, or finishing in reverse order (as Ray may), give equal
  bits (the sum is a left fold in shard order).
* Shard jobs pickle with cloudpickle (Ray) and compute the same bits after a round trip.
"""

from __future__ import annotations

import dataclasses
import json

import cloudpickle
import numpy as np
import pytest
import torch
from attribution_kfac import curvlinops_adapter
from attribution_kfac.backends import fit_layers
from attribution_kfac.kfac import EKFACHessian, KFACHessian
from attribution_kfac.options import KFACOptions
from attribution_kfac.problem import DataPass, layer_blocks
from attribution_kfac.sharded import CorrectionShard, KroneckerShard
from kfac_toys import ToyTask, fit_inputs, inputs
from torch import nn

from attribution_core import LocalExecutor, ShardRunner, attribute
from attribution_core.gradients import select_parameters
from attribution_core.testing import allclose_report

pytest.importorskip("curvlinops")

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
E2E_RTOL = 1e-10
SEED = 1234


class ReversedExecutor(LocalExecutor):
    """Finishes jobs in reverse order (as a Ray run may)."""

    def map(self, fn, items, *, desc="", progress=False):
        yield from reversed(list(super().map(fn, items)))


def _runner(count: int, executor=None) -> ShardRunner:
    return ShardRunner(executor or LocalExecutor(), count=count, align=1)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """``got ≈ want`` to ``RTOL[dtype]`` of ``want``'s largest entry."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    scale = want.abs().max().item()
    assert scale > 0, f"{what}: zero tensor (a vacuous comparison)"
    report = allclose_report(got, want, rtol=0.0, atol=RTOL[want.dtype] * scale)
    assert not report, f"{what}: {report}"


def _conv(dtype: torch.dtype) -> ToyTask:
    """Conv2d → ReLU → Linear, MSE, 24 rows in batches of 7 (batch boundaries move per shard)."""
    return ToyTask(
        lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 2)),
        inputs(24, (1, 5, 5)).to(dtype),
        n_out=2,
    )


@pytest.fixture(scope="module")
def ddpm64():
    """An untrained width-8 U-Net on 12 digits, float64, S = 2 draws per example."""
    from attribution_core import get_registry

    if "ddpm-digits" not in get_registry().names("task"):
        pytest.skip("the diffusion plugin (task ddpm-digits) is not installed")
    from attribution_diffusion.task import DDPMDigitsTask

    task = DDPMDigitsTask(dtype=torch.float64, n_train=12, width=8, n_samples=2, T=50)
    return task, task.build_model(0)


def _jobs(task, model, options: KFACOptions):
    """``(problem, layers, KroneckerShard job)`` of ``task`` at ``model``."""
    params, _ = select_parameters(model)
    problem = task.curvature_problem(model, 0, 2)
    blocks = layer_blocks(problem, params, not options.separate_weight_and_bias, "test")
    layers = fit_layers(problem, blocks)
    return problem, layers, KroneckerShard.of(problem, layers, options, SEED)


def _bases(A: dict, G: dict) -> tuple[dict, dict]:
    """Eigenbases of the factors (fixed for both sides of a correction comparison)."""
    QA = {k: torch.linalg.eigh(v).eigenvectors for k, v in A.items()}
    QG = {k: torch.linalg.eigh(v).eigenvectors for k, v in G.items()}
    return QA, QG


def _assert_four_shards_sum_to_one_pass(problem, layers, options, job, same_keys=False):
    """A/G of 4 shards (and EK-FAC's correction in the one-pass eigenbases) equal one pass."""
    one = job.passes().kronecker_sums(DataPass.of(problem, 0))
    four = _runner(4).reduce("kfac-factors", job, problem.n_examples)
    for which, ref in zip("AG", one, strict=True):
        if same_keys:
            assert set(four[which]) == set(ref)
        for name, want in ref.items():
            _close(four[which][name], want, f"{which} of {name}")
    QA, QG = _bases(*one)
    corr = CorrectionShard.of(problem, layers, options, SEED, QA=QA, QG=QG)
    want = corr.passes().eigenvalue_correction(DataPass.of(problem, 1), QA, QG)
    got = _runner(4).reduce("ekfac-correction", corr, problem.n_examples)
    for name, parts in want.items():
        for part, value in parts.items():
            _close(got[name][part], value, f"E of {name}.{part}")


# ---- rows ----------------------------------------------------------------------------------------
def test_ddpm_rows_are_seeded_per_example(ddpm64):
    task, model = ddpm64
    problem = task.curvature_problem(model, 7, 2)
    assert problem.per_example == 2 and problem.n_examples == 12
    for p in (0, 1):
        full = list(problem.batches(p))
        parts = [b for r in (slice(0, 5), slice(5, 6), slice(6, 12)) for b in problem.batches(p, r)]
        for key in ("x_t", "t"):
            whole = torch.cat([X[key] for X, _ in full])
            assert torch.equal(whole, torch.cat([X[key] for X, _ in parts])), key
        assert torch.equal(torch.cat([y for _, y in full]), torch.cat([y for _, y in parts]))
    other = next(iter(problem.batches(1, slice(0, 1))))[1]
    assert not torch.equal(next(iter(problem.batches(0, slice(0, 1))))[1], other)


def test_shard_pseudo_targets_equal_curvlinops_on_the_same_rows(ddpm64):
    """A shard's pass (rows 5..12, pass 0) through the hooks and through curvlinops' operator."""
    task, model = ddpm64
    options = KFACOptions(fisher="mc", mc_samples=2)
    problem, _, job = _jobs(task, model, options)
    got = job(slice(5, 12))
    params, _ = select_parameters(model)
    op = curvlinops_adapter.kronecker_operator(
        problem, list(params.values()), DataPass.of(problem, 0, slice(5, 12)), options,
        ekfac=False, seed=SEED,
    )  # fmt: skip
    want_A, want_G = curvlinops_adapter.kronecker_factors(op)
    for name in want_G:
        _close(got["G"][name], want_G[name], f"G of {name}")
        if name in want_A:
            _close(got["A"][name], want_A[name], f"A of {name}")


# ---- round-off: 1 shard vs 4 ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("fisher,mc", [("mc", 2), ("empirical", 1), ("type-2", 1)])
def test_four_shards_sum_to_one_pass(dtype, fisher, mc):
    task = _conv(dtype)
    model = task.build_model(0)
    options = KFACOptions(fisher=fisher, mc_samples=mc)
    problem, layers, job = _jobs(task, model, options)
    _assert_four_shards_sum_to_one_pass(problem, layers, options, job, same_keys=True)


def test_ddpm_four_shards_sum_to_one_pass(ddpm64):
    """The U-Net: dict inputs, S = 2 rows per example, (t, ε) and pseudo-targets per example."""
    task, model = ddpm64
    options = KFACOptions(fisher="mc", mc_samples=2)
    problem, layers, job = _jobs(task, model, options)
    _assert_four_shards_sum_to_one_pass(problem, layers, options, job)


@pytest.mark.parametrize("cls", [KFACHessian, EKFACHessian])
def test_four_shards_match_one_pass_through_the_hessian(cls):
    """Fit, eigendecompose, solve: 1 shard vs 4 (float64 conv toy, MC Fisher, 2 samples).

    Factors of full rank here (24 rows, at most 18 dimensions per factor): with rank-deficient
    factors (fewer rows than dimensions, e.g. the tiny U-Net's 24 rows against a 32-dimensional
    time embedding) ``eigh`` picks the basis of the null space from round-off, and EK-FAC's
    corrected eigenvalues of a *fresh* pass in that basis are then not a function of the
    factors — any change of summation order (shards, back-end) moves them by O(1) there. The
    statistics themselves are compared in fixed bases above.
    """
    task = _conv(torch.float64)
    model = task.build_model(0)
    params, _ = select_parameters(model)
    base = fit_inputs(task, model, params)
    hessian = cls(damping=1e-4, cache=False, mc_samples=2)
    one = hessian.fit(base)
    four = hessian.fit(dataclasses.replace(base, shards=_runner(4)))
    assert one.describe()["sharding"]["sharded"] is False
    assert four.describe()["sharding"] == {
        "sharded": True,
        "shards": 4,
        "phases": ["kfac-factors", "ekfac-correction"] if hessian.ekfac else ["kfac-factors"],
    }
    for key, want in one.factors.items():
        if "|Q" not in key:  # eigenvalues (λ, λ_G λ_Aᵀ or corrected); eigenvector signs may flip
            _close(four.factors[key], want, key)
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(3, one.n_params, generator=gen, dtype=torch.float64)
    got, want = four.solve(G), one.solve(G)
    assert ((got - want).norm() / want.norm()).item() < E2E_RTOL


# ---- bits ----------------------------------------------------------------------------------------
def test_four_shards_give_the_same_bits_twice_and_in_any_finishing_order(ddpm64):
    task, model = ddpm64
    params, _ = select_parameters(model)
    base = fit_inputs(task, model, params)
    runs = [
        EKFACHessian(damping=1e-4, cache=False).fit(dataclasses.replace(base, shards=runner))
        for runner in (_runner(4), _runner(4), _runner(4, ReversedExecutor()))
    ]
    for other in runs[1:]:
        assert other.factors.keys() == runs[0].factors.keys()
        assert all(torch.equal(other.factors[k], v) for k, v in runs[0].factors.items())


def test_shard_jobs_pickle_and_compute_the_same_bits(ddpm64):
    task, model = ddpm64
    options = KFACOptions(fisher="mc")
    problem, layers, job = _jobs(task, model, options)
    rows = slice(3, 9)
    QA, QG = _bases(*job.passes().kronecker_sums(DataPass.of(problem, 0, rows)))
    corr = CorrectionShard.of(problem, layers, options, SEED, QA=QA, QG=QG)
    for j in (job, corr):
        again = cloudpickle.loads(cloudpickle.dumps(j))
        a, b = j(rows), again(rows)
        flat = [(k, v, b[k][p]) for k, d in a.items() for p, v in d.items()]
        assert flat and all(torch.equal(x, y) for _, x, y in flat)


# ---- what stays local ----------------------------------------------------------------------------
def test_curvlinops_backend_and_old_style_tasks_stay_local():
    task = _conv(torch.float64)
    model = task.build_model(0)
    params, _ = select_parameters(model)
    base = dataclasses.replace(fit_inputs(task, model, params), shards=_runner(4))
    info = KFACHessian(backend="curvlinops", cache=False).fit(base).describe()["sharding"]
    assert info["sharded"] is False and "curvlinops" in info["why"]

    class OldStyle(ToyTask):
        def curvature_problem(self, model, seed, n_samples):
            problem = super().curvature_problem(model, seed, n_samples)
            rows = problem.batches
            return dataclasses.replace(problem, batches=lambda pass_index: rows(pass_index))

    old = OldStyle(task.make_model, task._data["x"], n_out=2)
    sharded_fit = KFACHessian(cache=False).fit(dataclasses.replace(base, task=old))
    assert sharded_fit.describe()["sharding"]["sharded"] is False


# ---- through attribute() -------------------------------------------------------------------------
def test_attribute_with_four_shards_matches_one_shard(tmp_path):
    """digits-classifier, kfac- and ekfac-influence: ``shards: 4`` vs ``shards: 1``."""
    cfg = {
        "task": {"name": "digits-classifier", "n_train": 40, "hidden": 8, "steps": 10},
        "methods": ["kfac-influence", "ekfac-influence"],
        "queries": {"count": 3},
        "chunk_size": 8,
    }
    one = attribute({**cfg, "shards": 1}, out=tmp_path / "one")
    four = attribute({**cfg, "shards": 4}, out=tmp_path / "four")
    for label, phases in (
        ("kfac-influence", ["kfac-factors"]),
        ("ekfac-influence", ["kfac-factors", "ekfac-correction"]),
    ):
        manifest = json.loads((tmp_path / "four" / label / "manifest.json").read_text())
        for phase in phases:
            assert manifest["shards"]["phases"][phase]["shards"] == 4, manifest["shards"]
        assert manifest["info"]["curvature"]["sharding"]["sharded"] is True
        a, b = (torch.from_numpy(np.array(r.scores[label])).double() for r in (four, one))
        rel = ((a - b).norm() / b.norm()).item()
        print(f"{label}: 4 shards vs 1, relative Frobenius difference {rel:.2e}")
        assert rel < RTOL[torch.float32]


def test_the_factor_cache_keys_the_shard_boundaries(tmp_path):
    task = _conv(torch.float64)
    model = task.build_model(0)
    params, _ = select_parameters(model)
    base = fit_inputs(task, model, params, cache_dir=tmp_path)
    sharded = dataclasses.replace(base, shards=_runner(4))
    assert not KFACHessian().fit(sharded).describe()["from_cache"]
    assert not KFACHessian().fit(base).describe()["from_cache"]  # other bits: another entry
    assert KFACHessian().fit(sharded).describe()["from_cache"]
    assert (
        not KFACHessian().fit(dataclasses.replace(base, shards=_runner(3))).describe()["from_cache"]
    )
