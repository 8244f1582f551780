"""Acceptance 2 (d-trak = trak up to its functions) and the projected-gradient cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from trak_helpers import lr_config

from attribution_core import attribute, get_registry


def test_dtrak_with_loss_functions_reproduces_trak_bitwise():
    dtrak = {
        "name": "d-trak",
        "label": "d-trak-as-trak",
        "train_function": "loss",
        "query_function": "mse",
        "proj_dim": 16,
    }
    res = attribute(lr_config([{"name": "trak", "proj_dim": 16}, dtrak], dtype="float32"))
    assert np.array_equal(res.scores["trak"], res.scores["d-trak-as-trak"])


def test_dtrak_with_loss_functions_reproduces_trak_bitwise_mlp():
    cfg = {
        "task": {
            "name": "digits-classifier",
            "classes": [0, 1],
            "n_train": 40,
            "hidden": 4,
            "steps": 20,
        },
        "queries": {"source": "generated", "count": 3},
        "target": "cross-entropy",
        "methods": [
            {"name": "trak", "proj_dim": 128},
            {
                "name": "d-trak",
                "label": "d",
                "train_function": "loss",
                "query_function": "cross-entropy",
                "proj_dim": 128,
            },
        ],
    }
    res = attribute(cfg)
    assert np.array_equal(res.scores["trak"], res.scores["d"])


def test_presets_differ_only_in_functions():
    reg = get_registry()
    trak = reg.get("method", "trak").factory
    dtrak = reg.get("method", "d-trak").factory
    assert (trak.scorer, trak.hessian, trak.compressor, trak.defaults) == (
        dtrak.scorer,
        dtrak.hessian,
        dtrak.compressor,
        dtrak.defaults,
    )
    assert (trak.train_function, trak.query_function) == ("loss", None)
    assert (dtrak.train_function, dtrak.query_function) == ("square-norm", "square-norm")


def test_cached_projected_gradients_are_reused_for_new_queries(tmp_path):
    """Second run with other queries reads the (N, k) projected matrix; scores unchanged."""
    cache = str(tmp_path / "cache")
    method = {"name": "trak", "proj_dim": 8}
    first = attribute(lr_config([method], cache_dir=cache))
    files = sorted(Path(cache, "gradients").glob("*.npy"))
    assert len(files) == 1
    stored = np.load(files[0], mmap_mode="r")
    assert stored.shape == (30, 8)  # projected, not (30, p)
    mtime = files[0].stat().st_mtime_ns
    cfg = lr_config([method], cache_dir=cache)
    cfg["queries"] = {"source": "generated", "count": 3, "seed": 1}
    second = attribute(cfg)
    assert files[0].stat().st_mtime_ns == mtime  # read, not rewritten
    assert len(list(Path(cache, "gradients").glob("*.npy"))) == 1
    uncached = attribute(cfg)
    assert np.array_equal(second.scores["trak"], uncached.scores["trak"])
    assert not np.array_equal(first.scores["trak"], second.scores["trak"])


@pytest.mark.parametrize("change", [{"proj_dim": 9}, {"projection": "rademacher"}, {"seed": 5}])
def test_cache_key_separates_projections(tmp_path, change):
    cache = str(tmp_path / "cache")
    attribute(lr_config([{"name": "trak", "proj_dim": 8}], cache_dir=cache))
    attribute(lr_config([{"name": "trak", "proj_dim": 8, **change}], cache_dir=cache))
    assert len(list(Path(cache, "gradients").glob("*.npy"))) == 2


def test_manifest_records_resolved_backend_and_damping():
    res = attribute(lr_config([{"name": "trak", "proj_dim": 50, "backend": "traker"}]))
    info = res.manifests["trak"]["info"]
    assert info["compressor"]["resolved_backend"] == "torch"  # traker pitfall at k ≤ 100
    assert info["compressor"]["backend"] == "traker"
    assert info["curvature"]["damping_mode"] == "relative"
    assert info["curvature"]["damping_factor"] == 0.1
    assert info["curvature"]["damping"] == pytest.approx(0.1 * info["curvature"]["mean_eigenvalue"])
