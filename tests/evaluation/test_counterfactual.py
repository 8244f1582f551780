"""Retraining without top influences, checked against closed-form ridge refits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_suite import ridge_mse


def test_counterfactual_changes_match_closed_form(lin_suite, tmp_path) -> None:
    from attribution_core.evaluation.counterfactual import counterfactual
    from attribution_core.registry import get_registry

    suite, cfg = lin_suite
    data = json.loads(json.dumps(cfg))
    data["evaluation"] = {
        "suite": str(suite),
        "counterfactual": {"remove_fraction": 0.1, "seeds": 2, "queries": 2},
    }
    table = counterfactual(data, tmp_path / "cf")
    assert (tmp_path / "cf" / "counterfactual.csv").is_file()
    assert len(table) == 2 * 2 and (table["removed"] == 4).all()

    task = (
        get_registry()
        .get("task", "linear-regression")
        .factory(dtype=torch.float64, n_train=40, dim=4)
    )
    X, y = task.train_data()["x"].numpy(), task.train_data()["y"].numpy()
    Xq, yq = np.load(suite / "queries" / "samples.npy"), np.load(suite / "queries" / "y.npy")
    full = ridge_mse(X, y, np.ones(40), task.l2, Xq, yq)
    for _, row in table.iterrows():
        s = np.load(tmp_path / "cf" / row["label"] / "scores.npy")[:, row["query"]]
        w = np.ones(40)
        w[np.argsort(-s, kind="stable")[:4]] = 0
        expected = ridge_mse(X, y, w, task.l2, Xq, yq)[row["query"]] - full[row["query"]]
        # deterministic closed-form task: both seeds give the same change (float64, 1e-9)
        assert row["change_mean"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert row["change_stderr"] == pytest.approx(0.0, abs=1e-12)


def test_counterfactual_merged_into_report(lin_bench, lin_suite) -> None:
    from attribution_core.evaluation.counterfactual import counterfactual

    suite, cfg = lin_suite
    data = json.loads(json.dumps(cfg))
    data["evaluation"] = {
        "suite": str(suite),
        "counterfactual": {"remove_fraction": 0.2, "seeds": 1, "queries": 1},
    }
    counterfactual(data, lin_bench)
    cf = pd.read_csv(lin_bench / "counterfactual.csv")
    assert set(cf["label"]) >= {"grad-dot", "dense-influence"}
    assert "Retraining without top influences" in (lin_bench / "report.md").read_text()


def test_oracle_methods_are_skipped(lin_suite, tmp_path) -> None:
    from attribution_core.errors import ConfigError
    from attribution_core.evaluation.counterfactual import counterfactual

    suite, cfg = lin_suite
    data = json.loads(json.dumps(cfg))
    data["evaluation"] = {
        "suite": str(suite),
        "counterfactual": {"remove_fraction": 0.1, "seeds": 1, "queries": 1},
    }
    data["methods"] = ["exact-retraining"]
    with pytest.raises(ConfigError, match="counterfactual needs a method with scores"):
        counterfactual(data, tmp_path / "cf")
    data["methods"] = ["grad-dot", "exact-retraining"]
    table = counterfactual(data, tmp_path / "cf")
    assert list(table["label"]) == ["grad-dot"]


def test_rerun_with_other_settings_never_reuses_stale_runs(lin_suite, tmp_path) -> None:
    """Same --out, other remove_fraction: new runs are trained, the table matches a fresh dir."""
    from attribution_core.evaluation.counterfactual import counterfactual

    suite, cfg = lin_suite
    data = json.loads(json.dumps(cfg))
    data["evaluation"] = {
        "suite": str(suite),
        "counterfactual": {"remove_fraction": 0.1, "seeds": 1, "queries": 1},
    }
    first = counterfactual(data, tmp_path / "cf")
    runs = tmp_path / "cf" / "counterfactual" / "runs"
    before = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}
    again = counterfactual(data, tmp_path / "cf")  # same settings: everything reused
    assert {p.name: p.stat().st_mtime_ns for p in runs.iterdir()} == before
    pd.testing.assert_frame_equal(first, again)

    data["evaluation"]["counterfactual"]["remove_fraction"] = 0.3
    reused = counterfactual(data, tmp_path / "cf")
    fresh = counterfactual(data, tmp_path / "fresh")
    assert (reused["removed"] == 12).all()
    pd.testing.assert_frame_equal(reused, fresh)
    # the full-data runs do not depend on remove_fraction and are reused, not retrained
    full = [n for n in before if n.startswith("full-seed0-")]
    assert len(full) == 1 and (runs / full[0]).stat().st_mtime_ns == before[full[0]]


def test_same_steps_asks_the_task_hook(registry) -> None:
    """Options change only where the task's ``full_step_options`` hook changes them."""
    from attribution_core.config import load_config
    from attribution_core.evaluation.counterfactual import _same_steps

    lin = load_config(
        {"task": {"name": "linear-regression", "n_train": 40}, "methods": ["grad-dot"]}
    )
    assert _same_steps(lin, registry) == (lin, False)
    if "ddpm-digits" not in registry.names("task"):
        pytest.skip("diffusion plugin not installed")
    ddpm = load_config({"task": {"name": "ddpm-digits", "train_steps": 5}, "methods": ["grad-dot"]})
    switched_cfg, switched = _same_steps(ddpm, registry)
    assert switched and switched_cfg.task.options == {"train_steps": 5, "scale_steps": False}
    assert _same_steps(switched_cfg, registry) == (switched_cfg, False)  # already full-step
