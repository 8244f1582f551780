"""--dry-run prints the plan and trains nothing; a run over the memory budget is refused first."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import LIN

from attribution_core.dry_run import plan_attribute, plan_bench, plan_suite
from attribution_core.interfaces import Task
from attribution_core.testing import run_cli, write_config


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any training during a dry run fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run trained a model")

    monkeypatch.setattr(Task, "base_model", refuse)
    monkeypatch.setattr(Task, "train_ensemble", refuse)


def test_attribute_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path: Path, no_training: None
) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", LIN)
    code, text = run_cli("attribute", str(cfg), "--out", str(tmp_path / "out"), "--dry-run")
    assert code == 0, text
    for needle in (
        "plan: attribute",
        "n_train=40 n_query=5 n_params=5",
        "method grad-dot:",
        "query_gradients",
        "train_gradients_and_scores",
        "ms per example batched",
        "estimated peak memory",
        "estimated time",
    ):
        assert needle in text, text
    assert not (tmp_path / "out").exists()


def test_plan_phases_and_sizes(lin_suite: Path, no_training: None) -> None:
    plan = plan_attribute(LIN)
    assert (plan.sizes.n_train, plan.sizes.n_query, plan.sizes.n_params) == (40, 5, 5)
    dense = [p for p in plan.phases if p.label == "dense-influence" and p.phase.name == "fit"]
    assert dense[0].phase.bytes == 2 * 5 * 5 * 8  # the dense Hessian's own estimate
    assert all(p.peak_bytes >= plan.baseline_bytes for p in plan.phases)
    assert plan.seconds is not None and plan.seconds > 0
    trak = plan_attribute({**LIN, "methods": [{"name": "trak", "proj_dim": 64}]})
    query = next(p for p in trak.phases if p.phase.name == "query_gradients")
    assert query.phase.held == 2 * 5 * 64 * 8  # the kept projection matrix Φ, while drawn
    assert query.peak_bytes >= trak.baseline_bytes + query.phase.held
    bench = plan_bench({**LIN, "evaluation": {"suite": str(lin_suite)}})
    assert bench.sizes.n_query == 5 and bench.command == "bench"
    suite = plan_suite(LIN)
    (retrain,) = [p for p in suite.phases if p.phase.name == "retraining"]
    assert "12 subsets" in retrain.phase.note and retrain.seconds is not None


def test_bench_and_suite_build_dry_runs(lin_suite: Path, tmp_path: Path, no_training: None) -> None:
    cfg = write_config(tmp_path / "b.yaml", {**LIN, "evaluation": {"suite": str(lin_suite)}})
    code, text = run_cli("bench", str(cfg), "--out", str(tmp_path / "b"), "--dry-run")
    assert code == 0 and "plan: bench" in text, text
    cfg = write_config(tmp_path / "s.yaml", LIN)
    code, text = run_cli("suite", "build", str(cfg), "--out", str(tmp_path / "s"), "--dry-run")
    assert code == 0 and "plan: suite build" in text and "retraining" in text, text
    assert not (tmp_path / "b").exists() and not (tmp_path / "s").exists()


def test_dense_hessian_over_memory_is_refused_before_work(tmp_path: Path) -> None:
    big = {**LIN, "task": {"name": "linear-regression", "n_train": 8, "dim": 200_000}}
    big["methods"] = ["dense-influence"]
    cfg = write_config(tmp_path / "cfg.yaml", big)
    for extra in (["--dry-run"], []):
        code, text = run_cli("attribute", str(cfg), "--out", str(tmp_path / "out"), *extra)
        assert code == 2, text
        assert "memory: " in text and "phase 'fit' of method 'dense-influence'" in text
        assert "use kfac/ekfac" in text and "MiB" in text
    assert not (tmp_path / "out").exists()


def test_budget_names_chunk_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTRIBUTION_MAX_MEMORY_MB", "1")
    cfg = write_config(tmp_path / "cfg.yaml", {**LIN, "methods": ["grad-dot"]})
    code, text = run_cli("attribute", str(cfg), "--out", str(tmp_path / "out"))
    assert code == 2 and "ATTRIBUTION_MAX_MEMORY_MB" in text, text
    assert "chunk_size" in text or "queries.count" in text
    assert not (tmp_path / "out").exists()


def test_training_step_phases_are_timed_by_one_measured_step(no_training: None) -> None:
    """A task with the training-step hook: the probe times one optimiser step, the sizes carry
    T, and a replay phase (metagradient, single-model retraining) costs rows × that step."""
    from attribution_metagrad.budget import pass_runs

    from attribution_core.testing import LINEAR_GD_TASK

    gd = {**LIN, "task": LINEAR_GD_TASK, "methods": [{"name": "metagradient", "query_batch": 2}]}
    plan = plan_attribute(gd)
    T = LINEAR_GD_TASK["steps"]
    assert plan.sizes.train_steps == T
    assert plan.probe is not None and plan.probe.seconds_per_step > 0
    (mg,) = plan.phases
    assert mg.phase.cost == "training-step"
    assert mg.phase.rows == round(pass_runs(5, 2) * T)
    assert mg.seconds == pytest.approx(mg.phase.rows * plan.probe.seconds_per_step)
    single = {**gd, "evaluation": {"lds": {"protocol": "single-model", "subsets": 12}}}
    (retrain,) = [p for p in plan_suite(single).phases if p.phase.name == "retraining"]
    assert retrain.phase.cost == "training-step" and retrain.phase.rows == 13 * T  # 12 + base
    closed = plan_attribute(LIN)  # closed form: no hook, no step to time
    assert closed.sizes.train_steps == 0 and closed.probe.seconds_per_step is None


def test_metagradient_time_model_reproduces_the_measured_passes() -> None:
    """``pass_runs`` against every T = 100, width-16 row of the perf benchmark (CPU time):
    within 10 % (the rows were measured on a shared VM; see metagradient_perf.md)."""
    import json

    from attribution_metagrad.budget import pass_runs

    path = Path(__file__).parents[2] / "benchmarks/results/metagradient_perf.json"
    rows = [r for r in json.loads(path.read_text()) if r["steps"] == 100 and r["width"] == 16]
    assert len(rows) >= 5
    for r in rows:
        measured = r["per_query_x_cpu"] * r["queries"]
        assert pass_runs(r["queries"], r["query_batch"]) == pytest.approx(measured, rel=0.1), r
