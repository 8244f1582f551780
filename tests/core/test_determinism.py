"""Same config and seed → bitwise-identical scores; the manifest records what made them."""

from __future__ import annotations

import json

import numpy as np

from attribution_core import attribute

CONFIG = {
    "task": {"name": "digits-classifier", "n_train": 120, "hidden": 8, "steps": 60},
    "queries": {"count": 4, "seed": 1},
    "target": "cross-entropy",
    "threads": 1,
    "methods": ["grad-dot", {"name": "dense-influence", "damping": 0.1, "label": "dense"}],
}


def test_bitwise_identical_and_manifest(tmp_path):
    a = attribute(CONFIG, out=tmp_path / "a")
    attribute(CONFIG, out=tmp_path / "b")
    for label in ("grad-dot", "dense"):
        sa = np.load(tmp_path / "a" / label / "scores.npy")
        sb = np.load(tmp_path / "b" / label / "scores.npy")
        assert sa.dtype == np.float32 and sa.shape == (120, 4)
        assert sa.tobytes() == sb.tobytes()
        assert np.array_equal(a.scores[label], sa)
    manifest = json.loads((tmp_path / "a" / "dense" / "manifest.json").read_text())
    assert manifest["threads"] == 1
    assert manifest["seeds"] == {"run": 0, "method": 0, "model": 0, "queries": 1}
    assert {"python", "torch", "numpy"} <= set(manifest["versions"])
    assert {"model", "queries", "fit", "query_gradients", "total"} <= set(manifest["timings"])
    assert manifest["config"]["methods"][1]["damping"] == 0.1
    assert manifest["info"]["parameters"]["n_params"] == 64 * 8 + 8 + 8 * 10 + 10


def test_method_seed_changes_nothing_deterministic_but_is_recorded(tmp_path):
    cfg = {**CONFIG, "methods": [{"name": "grad-dot", "seed": 7}]}
    res = attribute(cfg, out=tmp_path)
    assert res.manifests["grad-dot"]["seeds"]["method"] == 7


def test_resume_skips_finished_methods(tmp_path):
    attribute(CONFIG, out=tmp_path)
    stamp = (tmp_path / "dense" / "scores.npy").stat().st_mtime_ns
    attribute(CONFIG, out=tmp_path)
    assert (tmp_path / "dense" / "scores.npy").stat().st_mtime_ns == stamp
    changed = {**CONFIG, "methods": [{"name": "dense-influence", "damping": 0.2, "label": "dense"}]}
    attribute(changed, out=tmp_path)
    assert (tmp_path / "dense" / "scores.npy").stat().st_mtime_ns != stamp
