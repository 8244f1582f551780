"""``lissa-influence`` and ``arnoldi-influence`` run by name through ``attribution attribute``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attribution_core.testing import run_attribute

TINY_DDPM = {
    "name": "ddpm-digits",
    "width": 2,
    "channel_mult": [1],
    "T": 10,
    "n_train": 6,
    "train_steps": 2,
}


@pytest.mark.parametrize(
    ("method", "recorded"),
    [
        ({"name": "lissa-influence", "max_depth": 20, "damping": 1.0}, "truncation_factor"),
        ({"name": "arnoldi-influence", "rank": 4, "iterations": 8}, "max_ritz_residual"),
    ],
)
def test_preset_runs_by_name_on_ddpm(tmp_path, method, recorded):
    config = {"task": TINY_DDPM, "methods": [method], "queries": {"count": 2, "seed": 1}}
    code, output = run_attribute(config, tmp_path / "out", "--quiet")
    assert code == 0, output
    out = tmp_path / "out" / method["name"]
    scores = np.load(out / "scores.npy")
    assert scores.shape == (6, 2) and scores.dtype == np.float32
    assert np.isfinite(scores).all() and np.abs(scores).sum() > 0
    curvature = json.loads((out / "manifest.json").read_text())["info"]["curvature"]
    assert recorded in curvature
