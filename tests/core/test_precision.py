"""``precision``: float32 / tf32 / bf16 — validation, restore, agreement, cache separation.

Tolerances for bf16 (stated here, measured on this tiny conv net, seeds fixed):

* bfloat16 keeps 8 significant bits (unit roundoff u = 2⁻⁸ ≈ 3.9e-3). Rounding the inputs and
  outputs of every conv/linear in the forward and backward pass gives per-example gradients
  with a relative error of ~1 % (a few u, accumulated over layers; on the digits U-Net
  1.7 % untrained, 5.3 % trained — benchmarks/results/perf.md).
* grad-dot: a score is g_jᵀ g_q, so its error is ~1 % of |g_j||g_q| — small next to the spread
  of scores over training examples; only near-ties swap ranks. Measured per-query Spearman
  0.9978–0.9999 → asserted mean ≥ 0.99, min ≥ 0.98.
* influence: g_jᵀ (H + λI)⁻¹ g_q amplifies the rounding error in low-curvature directions by
  up to 1/λ, where the true gradients have little mass. With λ = 1e-2 measured 0.992–0.9998
  → asserted mean ≥ 0.99, min ≥ 0.97; with λ = 1e-8 (the preset default) agreement drops
  (measured 0.49–0.97), asserted only as "λ = 1e-2 agrees better than λ = 1e-8".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from attribution_core import ConfigError, attribute
from attribution_core.config import load_config
from attribution_core.gradients import example_noise, per_example_gradients, select_parameters
from attribution_core.precision import gradient_precision, run_precision
from attribution_core.wrap import ModuleTask


def tiny_task() -> ModuleTask:
    """A 3-class conv net on 96 random 8×8 images (conv + linear: the autocast-eligible ops)."""

    def net(seed: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(8 * 8 * 8, 16),
            nn.Tanh(),
            nn.Linear(16, 3),
        )

    g = torch.Generator().manual_seed(0)
    X = torch.randn(96, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    queries = {"x": X[:6] + 0.1, "y": y[:6]}
    return ModuleTask(net, {"x": X, "y": y}, "cross-entropy", queries=queries, steps=100, lr=0.01)


def run(task: ModuleTask, method: str | dict, precision: str, **cfg) -> np.ndarray:
    res = attribute(
        {"queries": {"count": 6}, "methods": [method], "precision": precision, **cfg}, task=task
    )
    label = next(iter(res.scores))
    assert res.manifests[label]["precision"]["precision"] == precision
    assert res.manifests[label]["config"]["precision"] == precision
    return res.scores[label]


def per_query_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([spearmanr(a[:, i], b[:, i])[0] for i in range(a.shape[1])])


@pytest.fixture(scope="module")
def task() -> ModuleTask:
    return tiny_task()


def test_bad_precision_fails_config_validation():
    with pytest.raises(ConfigError, match=r"precision: Input should be 'float32', 'tf32' or"):
        load_config({"methods": ["grad-dot"], "precision": "fp16"})
    with pytest.raises(ConfigError, match="needs dtype float32"):
        load_config({"methods": ["grad-dot"], "precision": "bf16", "dtype": "float64"})
    with (
        pytest.raises(ValueError, match="not one of float32, tf32, bf16"),
        run_precision("half", "cpu"),
    ):
        pass


def test_tf32_on_cpu_is_bit_identical_and_recorded(task):
    ref = run(task, "kfac-influence", "float32")
    res = attribute(
        {"queries": {"count": 6}, "methods": ["kfac-influence"], "precision": "tf32"}, task=task
    )
    np.testing.assert_array_equal(res.scores["kfac-influence"], ref)
    record = res.manifests["kfac-influence"]["precision"]
    assert record["applied"] is False and "no effect on cpu" in record["note"]


def test_tf32_scope_sets_and_restores_the_cuda_switches():
    from attribution_core.precision import _tf32_on, _tf32_state

    before = _tf32_state()
    with run_precision("tf32", "cuda") as record:  # flags only: no GPU needed to set them
        assert record["applied"] is True
        assert _tf32_state() == _tf32_on()
    assert _tf32_state() == before
    with pytest.raises(RuntimeError, match="boom"), run_precision("tf32", "cuda"):
        raise RuntimeError("boom")
    assert _tf32_state() == before


def test_bf16_gradients_are_float32_and_close():
    task = tiny_task()
    model = task.base_model(0)
    params, _ = select_parameters(model)
    m = task.training_loss()
    batch = {k: v[:16] for k, v in task.train_data().items()}
    noise = example_noise(m, batch, 0, "train", 0)
    G32 = per_example_gradients(model, m, batch, noise, params)
    assert gradient_precision() is None
    with run_precision("bf16", "cpu"):
        assert gradient_precision() == "bf16"
        G16 = per_example_gradients(model, m, batch, noise, params)
    assert gradient_precision() is None
    assert G16.dtype == torch.float32
    assert not torch.equal(G16, G32)  # autocast really ran in bfloat16
    rel = float((G16 - G32).norm() / G32.norm())
    assert rel < 0.05, f"bf16 per-example gradients off by {rel:.3g} (relative Frobenius)"


def test_bf16_grad_dot_agrees_with_float32(task):
    rho = per_query_spearman(run(task, "grad-dot", "float32"), run(task, "grad-dot", "bf16"))
    assert rho.mean() >= 0.99 and rho.min() >= 0.98, f"per-query Spearman {np.round(rho, 4)}"


def test_bf16_influence_agreement_and_its_damping_dependence(task):
    rho = {}
    for lam in (1e-2, 1e-8):
        entry = {"name": "kfac-influence", "damping": lam}
        rho[lam] = per_query_spearman(run(task, entry, "float32"), run(task, entry, "bf16"))
    assert rho[1e-2].mean() >= 0.99 and rho[1e-2].min() >= 0.97, np.round(rho[1e-2], 4)
    assert rho[1e-2].mean() > rho[1e-8].mean(), {k: np.round(v, 4) for k, v in rho.items()}


def test_bf16_never_reuses_float32_gradients_or_outputs(task, tmp_path):
    plain = run(task, "grad-dot", "bf16")
    cfg = {"cache_dir": str(tmp_path / "cache")}
    f32 = attribute(
        {"queries": {"count": 6}, "methods": ["grad-dot"], **cfg}, task=task, out=tmp_path / "o"
    )
    bf = attribute(
        {"queries": {"count": 6}, "methods": ["grad-dot"], "precision": "bf16", **cfg},
        task=task,
        out=tmp_path / "o",
    )
    assert not np.array_equal(bf.scores["grad-dot"], f32.scores["grad-dot"])
    np.testing.assert_array_equal(bf.scores["grad-dot"], plain)
    assert bf.manifests["grad-dot"]["identity"]["precision"] == "bf16"
    assert "precision" not in f32.manifests["grad-dot"]["identity"]  # float32 keys unchanged
