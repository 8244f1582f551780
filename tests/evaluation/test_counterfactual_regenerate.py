"""``counterfactual.regenerate``: queries regenerated from the same noise, pixel distances.

A tiny ``ddpm-digits`` (8 examples, T = 10, width 4, 2 training steps) keeps every run within a
few seconds; the distances are then small but the noise identity checks are exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from attribution_core.config import load_config
from attribution_core.errors import ConfigError
from attribution_core.evaluation.counterfactual import REGEN_COLUMNS, counterfactual
from attribution_core.evaluation.regenerate import pixel_distance, regenerate
from attribution_core.evaluation.suite import TRUTH_SEED
from attribution_core.registry import get_registry
from attribution_core.testing import run_cli, write_config

TINY = {
    "name": "ddpm-digits",
    "n_train": 8,
    "T": 10,
    "width": 4,
    "channel_mult": [1],
    "train_steps": 2,
    "batch_size": 4,
    "n_samples": 2,
}

pytestmark = pytest.mark.skipif(
    "ddpm-digits" not in get_registry().names("task"), reason="diffusion plugin not installed"
)


def config(**cf: object) -> dict:
    """Generated queries (count 3, seed 0); the base model's seed is the first retraining seed,
    so the full-data model of seed index 0 retrained in a job is the base model again."""
    return {
        "task": dict(TINY),
        "queries": {"source": "generated", "count": 3, "seed": 0},
        "model": {"seed": TRUTH_SEED},
        "methods": ["grad-dot"],
        "target": "loss",
        "dtype": "float64",
        "evaluation": {
            "counterfactual": {
                "remove_fraction": 0.25,
                "seeds": 2,
                "queries": 2,
                "regenerate": True,
                **cf,
            }
        },
    }


@pytest.fixture(scope="module")
def regen_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("regen") / "cf"
    return out, counterfactual(config(), out)


def test_base_model_regenerates_the_query_exactly(regen_run) -> None:
    out, _ = regen_run
    opts = {k: v for k, v in TINY.items() if k != "name"}
    task = get_registry().get("task", "ddpm-digits").factory(dtype=torch.float64, **opts)
    base = task.base_model(TRUTH_SEED)
    stored = np.load(out / "counterfactual" / "queries" / "samples.npy")  # (2, 1, 8, 8)
    # same model, same (count, seed): the same noise, hence the same samples (float64)
    again = regenerate(task, base, 2, count=3, seed=0)
    np.testing.assert_allclose(pixel_distance(again, stored), 0.0, atol=1e-12)
    info = json.loads((out / "counterfactual" / "info.json").read_text())
    assert info["regenerate_generation"] == {"count": 3, "seed": 0}
    np.testing.assert_allclose(info["regenerate_base_distance"], 0.0, atol=1e-12)
    # the noise of sample q depends on the count: count=2 draws other noise for the same seed
    assert pixel_distance(regenerate(task, base, 2, count=2, seed=0), stored).min() > 1e-3

    # inside the executor job: the full-data run of seed TRUTH_SEED is the base model retrained
    # by train_ensemble; it regenerates the queries to float64 round-off, the other seed does not
    full0 = np.load(_run_file(out, "full-seed0"))
    full1 = np.load(_run_file(out, "full-seed1"))
    assert full0.shape == (2, 2, 2)  # (target + pixel distance, value/stderr, query)
    np.testing.assert_allclose(full0[1, 0], 0.0, atol=1e-10)
    assert full1[1, 0].min() > 1e-3 and (full1[1, 1] == 0).all()
    samples0 = np.load(_run_file(out, "full-seed0", ".samples.npy"))
    np.testing.assert_allclose(samples0, stored, atol=1e-10)


def _run_file(out, name: str, suffix: str = ".npy"):
    """The stored file of run ``name`` (file names carry a digest of the run's settings)."""
    runs = out / "counterfactual" / "runs"
    (path,) = [p for p in runs.glob(f"{name}-*{suffix}") if p.name.count(".") == suffix.count(".")]
    return path


def test_regenerate_writes_finite_distance_columns(regen_run) -> None:
    out, table = regen_run
    csv = pd.read_csv(out / "counterfactual.csv")
    assert list(csv.columns[-len(REGEN_COLUMNS) :]) == REGEN_COLUMNS
    assert len(csv) == 2 and list(csv.columns) == list(table.columns)
    values = csv[REGEN_COLUMNS].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all()
    # top/random removal changes the model: its regenerated query moves
    assert (csv["regen_top_mean"] > 0).all() and (csv["regen_random_mean"] > 0).all()
    # full-data mean over seeds = (0 for the base seed + seed 1's distance) / 2
    full1 = np.load(_run_file(out, "full-seed1"))[1, 0]
    np.testing.assert_allclose(csv["regen_full_mean"], full1 / 2, atol=1e-10)
    grid = np.load(out / "counterfactual" / "regenerated.npy")
    assert grid.shape == (2, 4, 1, 8, 8) and grid.min() >= 0 and grid.max() <= 1


def test_regenerate_resumes_without_retraining(regen_run) -> None:
    out, table = regen_run
    runs = sorted((out / "counterfactual" / "runs").glob("*.npy"))
    assert len(runs) == 2 * (2 + 2 * 2 + 2 * 2)  # run file + samples for full, random, top
    stamps = {p.name: p.stat().st_mtime_ns for p in runs}
    again = counterfactual(config(), out)
    assert {p.name: p.stat().st_mtime_ns for p in runs} == stamps
    pd.testing.assert_frame_equal(again, table)


def test_regenerate_needs_generated_queries(tmp_path: Path) -> None:
    data = config()
    data["queries"] = {"source": "train", "count": 3}
    with pytest.raises(ConfigError, match=r"regenerate: needs generated queries.*'train'"):
        counterfactual(data, tmp_path / "api")
    assert not (tmp_path / "api" / "grad-dot").exists()  # nothing attributed or trained

    path = write_config(tmp_path / "bad.yaml", data)
    code, output = run_cli("counterfactual", str(path), "--out", str(tmp_path / "cli"))
    assert code == 2, output
    assert "queries.source='train'" in output
    assert not (tmp_path / "cli" / "counterfactual").exists()


def test_regenerate_is_off_by_default() -> None:
    cf = load_config(config()).evaluation.counterfactual
    assert cf is not None and cf.regenerate
    data = config()
    del data["evaluation"]["counterfactual"]["regenerate"]
    assert load_config(data).evaluation.counterfactual.regenerate is False


def test_suite_counterfactual_report_shows_regenerated_queries(tmp_path: Path) -> None:
    """Through a suite: (count, seed) come from the suite's config; report table and grid."""
    from attribution_core.evaluation.bench import bench
    from attribution_core.evaluation.suite import build_suite

    torch.set_num_threads(1)
    base = {
        "task": dict(TINY),
        "queries": {"source": "generated", "count": 3, "seed": 0},
        "methods": ["grad-dot"],
        "target": "loss",
        "evaluation": {"lds": {"subsets": 4, "seeds": 1, "kept_fraction": 0.5, "batch": 4}},
    }
    build_suite(base, tmp_path / "suite", command="pytest")
    data = {**base, "evaluation": {"suite": str(tmp_path / "suite")}}
    bench(data, tmp_path / "bench", n_boot=20)
    data["evaluation"]["counterfactual"] = {
        "remove_fraction": 0.25,
        "seeds": 1,
        "queries": 2,
        "regenerate": True,
    }
    counterfactual(data, tmp_path / "bench")
    info = json.loads((tmp_path / "bench" / "counterfactual" / "info.json").read_text())
    np.testing.assert_allclose(info["regenerate_base_distance"], 0.0, atol=1e-6)  # float32
    md = (tmp_path / "bench" / "report.md").read_text()
    assert "pixels_top" in md and "pixels_full" in md
    assert (tmp_path / "bench" / "figures" / "counterfactual_regenerated.png").is_file()
    assert "counterfactual_regenerated.png" in md
