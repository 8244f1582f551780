"""Exact retraining on a tiny ``ddpm-digits`` (real U-Net, batched ``train_ensemble``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution_core import ScoringContext, get_registry

TINY_DDPM = {"n_train": 6, "T": 20, "width": 4, "train_steps": 3, "batch_size": 4, "n_samples": 2}


@pytest.fixture
def ddpm():
    reg = get_registry()
    if "ddpm-digits" not in reg.names("task"):
        pytest.skip("ddpm-digits (plugin attribution_diffusion) is not installed")
    task = reg.create("task", "ddpm-digits", **TINY_DDPM)
    return reg, task


def test_ddpm_loo_is_paired_and_resumable(ddpm, tmp_path):
    from retrain_helpers import scorer_for

    reg, task = ddpm
    target = reg.create("measurement", "loss", task)
    queries = {"x": task.train_data()["x"][:2]}
    ctx = ScoringContext(target=target, cache_dir=str(tmp_path))
    scorer = scorer_for({"indices": [1, 4], "seeds": 2, "models_per_job": 3})
    scores = scorer.scores(task, None, queries, ctx).numpy()
    assert scores.shape == (6, 2)
    assert np.isfinite(scores[[1, 4]]).all() and np.isnan(scores[[0, 2, 3, 5]]).all()
    info = ctx.info["exact_retraining"]
    assert info["models_trained"] == 6 and info["seconds_per_model"] > 0

    # Common random numbers: retraining the full model of seed 0 alone (M=1 instead of inside a
    # vmapped ensemble of 3) and measuring it on the same stored draws reproduces the stored
    # value up to float32 reduction order (1e-5 relative); other draws move it far more.
    store = scorer._run.store
    from attribution_retrain.jobs import Job, JobEnv, run_job

    env = JobEnv(task, target, queries, scorer._run.noise)
    again = run_job(Job(0, ("x",), np.ones((1, 6)), env))
    np.testing.assert_allclose(again[0], store.get("seed0-full", 2), rtol=1e-5, atol=0)
    from attribution_core.gradients import example_noise

    other = example_noise(target, queries, 1, "target", 0)
    moved = run_job(Job(0, ("x",), np.ones((1, 6)), JobEnv(task, target, queries, other)))
    assert np.abs(moved[0] / again[0] - 1).max() > 1e-3

    rerun = scorer_for({"indices": [1, 4], "seeds": 2, "models_per_job": 3})
    ctx2 = ScoringContext(target=target, cache_dir=str(tmp_path))
    torch.testing.assert_close(
        rerun.scores(task, None, queries, ctx2).numpy(), scores, equal_nan=True
    )
    assert ctx2.info["exact_retraining"]["models_trained"] == 0
