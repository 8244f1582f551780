"""Acceptance 3 (small): trak and d-trak end to end through ``attribution attribute`` on a tiny
DDPM of the digits task (the full digits-2 run is in benchmarks/results/trak.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from attribution_core import get_registry
from attribution_core.cli import app

pytestmark = pytest.mark.skipif(
    "ddpm-digits" not in get_registry().names("task"), reason="diffusion plugin not installed"
)

TINY_DDPM = {
    "name": "ddpm-digits",
    "classes": [0, 1],
    "n_train": 24,
    "train_steps": 5,
    "width": 4,
    "n_samples": 2,
    "T": 20,
}


def test_trak_and_dtrak_run_end_to_end(tmp_path):
    cfg = {
        "task": TINY_DDPM,
        "queries": {"source": "generated", "count": 2},
        "target": "loss",
        "cache_dir": str(tmp_path / "cache"),
        "methods": [
            {"name": "trak", "proj_dim": 64},
            {"name": "d-trak", "proj_dim": 64},
            {
                "name": "d-trak",
                "label": "d-trak-l1",
                "proj_dim": 64,
                "train_function": "l1-norm",
                "query_function": "l1-norm",
            },
        ],
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["attribute", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    scores = {m: np.load(out / m / "scores.npy") for m in ("trak", "d-trak", "d-trak-l1")}
    for s in scores.values():
        assert s.shape == (24, 2) and s.dtype == np.float32 and np.isfinite(s).all()
    assert not np.array_equal(scores["trak"], scores["d-trak"])
    assert not np.array_equal(scores["d-trak"], scores["d-trak-l1"])
    manifest = json.loads((out / "d-trak" / "manifest.json").read_text())
    method = manifest["identity"]["method"]
    assert method["train_function"]["name"] == method["query_function"]["name"] == "square-norm"
    assert manifest["info"]["compressor"]["resolved_backend"] == "torch"
    assert {"fit", "query_gradients", "train_gradients_and_scores"} <= set(manifest["timings"])
    trak = json.loads((out / "trak" / "manifest.json").read_text())["identity"]["method"]
    assert trak["train_function"]["name"] == "loss" and trak["query_function"] == "target"
