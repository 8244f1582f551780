"""Both presets by name through ``attribution attribute``: on a tiny DDPM they run; on a
supervised task they stop with exit 2 and say why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attribution_core.testing import run_attribute

TINY_DDPM = {
    "name": "ddpm-digits",
    "classes": [0, 1],
    "n_train": 24,
    "train_steps": 5,
    "width": 4,
    "n_samples": 2,
    "T": 20,
}


def test_presets_run_by_name_on_ddpm(tmp_path):
    cfg = {
        "task": TINY_DDPM,
        "queries": {"source": "generated", "count": 2},
        "target": "loss",
        "methods": [
            {"name": "journey-trak", "proj_dim": 64},
            {"name": "das", "proj_dim": 64, "query_draws": 4},
        ],
    }
    code, output = run_attribute(cfg, tmp_path / "out")
    assert code == 0, output
    for label in ("journey-trak", "das"):
        s = np.load(tmp_path / "out" / label / "scores.npy")
        assert s.shape == (24, 2) and np.isfinite(s).all()
    assert (np.load(tmp_path / "out" / "das" / "scores.npy") >= 0).all()
    jt = json.loads((tmp_path / "out" / "journey-trak" / "manifest.json").read_text())
    method = jt["identity"]["method"]
    assert method["query_function"]["name"] == "journey-loss"
    das = json.loads((tmp_path / "out" / "das" / "manifest.json").read_text())
    curvature = das["info"]["curvature"]
    assert 0 < curvature["max_leverage"] < 1 and curvature["damping_mode"] == "relative"


@pytest.mark.parametrize("method", ["journey-trak", "das"])
def test_supervised_task_is_refused(tmp_path, method):
    cfg = {
        "task": {"name": "linear-regression", "n_train": 10, "dim": 2},
        "queries": {"source": "generated", "count": 2},
        "target": "mse",
        "methods": [method],
    }
    code, output = run_attribute(cfg, tmp_path / "out")
    assert code == 2, output
    assert "no diffusion noise schedule" in output and "diffusion tasks only" in output
    assert "linear-regression" in output
