"""Metagradient memory model and refusal (issue 18, acceptance 5), score cache, query draws.

* the estimate's state part equals an independent count of the parameters and Adam moments;
  the measured step residuals are at least the minibatch's input (the forward keeps it);
* a limit below the estimate is refused with exit 2 before any training step, stating it;
* a second run with the same cache directory reads the scores (bitwise equal) and never calls
  the reverse pass; other queries miss;
* ``query_draws: target`` differentiates with the suite's target draws: its scores equal the
  default's when the query stream is made to coincide with the target stream, and differ
  otherwise (a Monte-Carlo target on a tiny DDPM).
"""

from __future__ import annotations

import attribution_metagrad.scorer as scorer_module
import numpy as np
import pytest
import torch
from attribution_diffusion import DDPMDigitsTask
from attribution_metagrad.budget import (
    RUNTIME_OVERHEAD,
    MemoryEstimate,
    estimate_memory,
    require_fits,
)

from attribution_core import ConfigError, attribute, initial_training_state
from attribution_core.testing import LINEAR_GD_TASK, TINY_DDPM_OPTIONS, run_attribute

LINEAR_GD = LINEAR_GD_TASK
TINY_DDPM = TINY_DDPM_OPTIONS


def _tiny_ddpm() -> DDPMDigitsTask:
    return DDPMDigitsTask(dtype=torch.float64, batch_size=4, **TINY_DDPM)


def test_state_bytes_count_parameters_and_adam_moments():
    task = _tiny_ddpm()
    weights = torch.ones(task.n_train, dtype=task.dtype)
    est = estimate_memory(task, 0, weights, (5, 3, 2))
    n_params = sum(p.numel() for p in task.build_model(0).parameters())
    params, _ = initial_training_state(task, 0)
    assert sum(v.numel() for v in params.values()) == n_params
    # float64 θ, Adam m and v (no EMA in this recipe): 3 · 8 bytes per parameter
    assert est.state_bytes == 3 * 8 * n_params
    # the forward of a step keeps at least its (B, 1, 8, 8) noisy inputs
    assert est.step_bytes >= task.training_recipe().batch_size * 64 * 8
    assert est.total == (
        est.state_bytes * (5 + 3)
        + est.step_bytes * (1 + 2)
        + 2 * task.n_train * 3 * 8
        + RUNTIME_OVERHEAD
    )


def test_require_fits_refuses_with_the_estimate():
    est = MemoryEstimate(2**30, 10, 4, 2**28, 2, 0)  # 14 + 0.75 + 0.5 (runtime) GiB
    with pytest.raises(ConfigError, match=r"estimated peak memory 15\.2 GiB exceeds"):
        require_fits(est, 1.0)
    assert require_fits(est, 100.0) == 100.0


def test_cli_refuses_a_pass_above_the_memory_limit_before_training(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(scorer_module, "weight_gradients", lambda *a, **k: calls.append(1))
    method = {"name": "metagradient", "memory_limit_gb": 1e-9}
    config = {"task": LINEAR_GD, "target": "mse", "queries": {"source": "generated", "count": 2}}
    code, out = run_attribute({**config, "methods": [method]}, tmp_path / "out")
    assert code == 2 and "estimated peak memory" in out and "memory_limit_gb" in out, out
    assert not calls


def _config(cache_dir, count=3, **method):
    return {
        "task": LINEAR_GD,
        "dtype": "float64",
        "target": "mse",
        "queries": {"source": "generated", "count": count},
        "methods": [{"name": "metagradient", "cache_dir": str(cache_dir), **method}],
    }


def test_cached_scores_are_reused_bitwise_without_a_reverse_pass(tmp_path, monkeypatch):
    first = attribute(_config(tmp_path))
    assert first.manifests["metagradient"]["info"]["metagradient"]["cache"] == "miss"
    assert list((tmp_path / "metagradient").glob("*.safetensors"))

    def refuse(*a, **k):
        raise AssertionError("reverse pass run despite a cached entry")

    with monkeypatch.context() as patch:
        patch.setattr(scorer_module, "weight_gradients", refuse)
        second = attribute(_config(tmp_path))
    info = second.manifests["metagradient"]["info"]["metagradient"]
    assert info["cache"] == "hit"
    assert np.array_equal(first.scores["metagradient"], second.scores["metagradient"])
    other = attribute(_config(tmp_path, count=2))  # other queries: another entry
    assert other.manifests["metagradient"]["info"]["metagradient"]["cache"] == "miss"
    assert len(list((tmp_path / "metagradient").glob("*.safetensors"))) == 2


def _ddpm_scores(monkeypatch, query_draws, alias_streams=False):
    if alias_streams:  # make the query stream draw exactly what the target stream draws
        real = scorer_module.example_noise

        def aliased(measurement, batch, seed, stream, start):
            return real(measurement, batch, seed, "target" if stream == "query" else stream, start)

        monkeypatch.setattr(scorer_module, "example_noise", aliased)
    task = _tiny_ddpm()
    config = {
        "dtype": "float64",
        "target": {"name": "loss", "n_samples": 2},
        "queries": {"source": "generated", "count": 2},
        "methods": [{"name": "metagradient", "query_draws": query_draws}],
    }
    res = attribute(config, task=task)
    monkeypatch.undo()
    return res.scores["metagradient"]


def test_query_draws_target_uses_the_target_stream(monkeypatch):
    target = _ddpm_scores(monkeypatch, "target")
    query = _ddpm_scores(monkeypatch, "query")
    aliased = _ddpm_scores(monkeypatch, "query", alias_streams=True)
    assert np.array_equal(target, aliased)
    assert not np.allclose(target, query)
