"""Exact retraining against closed-form ridge regression (float64) and its resume contract.

Closed form (the task's objective, 1/N kept fixed when an example is removed)::

    θ_S = argmin (1/N) Σ_{j∈S} (y_j − θᵀx̃_j)² + λ‖θ‖²  ⇒  ((1/N) X̃_Sᵀ X̃_S + λI) θ_S = (1/N) X̃_Sᵀ y_S
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attribution_retrain.scorer import ExactRetrainingScorer
from attribution_supervised.measurements import SquaredError
from retrain_helpers import CountingLinearRegression, CrashAfter, SimulatedCrashError, scorer_for

from attribution_core import ConfigError, DataError, ScoringContext, attribute, get_registry
from attribution_core.testing import run_attribute

LINREG = {"name": "linear-regression", "n_train": 20, "dim": 3, "noise": 0.4, "ridge": 0.05}


def ridge(X: np.ndarray, y: np.ndarray, keep: np.ndarray, lam: float) -> np.ndarray:
    """θ for the kept rows, 1/N fixed at the full N (numpy, float64)."""
    n = X.shape[0]
    Xt = np.hstack([X, np.ones((n, 1))])[keep]
    A = Xt.T @ Xt / n + lam * np.eye(Xt.shape[1])
    return np.linalg.solve(A, Xt.T @ y[keep] / n)


def mse(theta: np.ndarray, Xq: np.ndarray, yq: np.ndarray) -> np.ndarray:
    return (yq - np.hstack([Xq, np.ones((len(yq), 1))]) @ theta) ** 2


def test_loo_equals_closed_form_leave_one_out():
    run = attribute(
        {
            "task": LINREG,
            "dtype": "float64",
            "target": "mse",
            "queries": {"count": 4},
            "methods": [{"name": "exact-retraining", "seeds": 2}],
        }
    )
    scores = run.scores["exact-retraining"]
    data = run.task.train_data()
    X, y = data["x"].numpy(), data["y"].numpy()
    Xq, yq = run.queries["x"].numpy(), run.queries["y"].numpy()
    n = len(y)
    full = mse(ridge(X, y, np.ones(n, bool), 0.05), Xq, yq)
    delta = np.stack([mse(ridge(X, y, np.arange(n) != j, 0.05), Xq, yq) - full for j in range(n)])
    assert scores.shape == (n, 4)
    # Two float64 dense solves of a 4x4 system: Δm agrees to 1e-6 absolute (acceptance bound).
    np.testing.assert_allclose(scores / n, delta, atol=1e-6, rtol=0)
    assert np.abs(delta).max() > 1e-3  # the check is not vacuous
    info = run.manifests["exact-retraining"]["info"]["exact_retraining"]
    assert info["seeds"] == [0, 1] and info["models_trained"] == 2 * (n + 1)


def test_index_subset_leaves_other_rows_nan():
    run = attribute(
        {
            "task": LINREG,
            "dtype": "float64",
            "target": "mse",
            "queries": {"count": 3},
            "methods": [
                {"name": "exact-retraining", "indices": [7, 2]},
                {"name": "exact-retraining", "label": "all"},
            ],
        }
    )
    sub, full = run.scores["exact-retraining"], run.scores["all"]
    rows = np.isin(np.arange(20), [2, 7])
    assert np.isnan(sub[~rows]).all()
    np.testing.assert_array_equal(sub[rows], full[rows])  # same closed-form models, bit for bit
    info = run.manifests["exact-retraining"]["info"]["exact_retraining"]
    assert info["computed_indices"] == [2, 7] and info["uncomputed_rows"] == "NaN"


def test_predict_subsets_without_oracle_retrains_each_mask(counting_task):
    task = counting_task
    scorer = scorer_for({"indices": [0]})
    queries = task.make_queries(None, 3, seed=1)
    ctx = ScoringContext(target=SquaredError())
    scores = scorer.scores(task, task.base_model(0), queries, ctx)
    masks = torch.as_tensor(np.random.default_rng(0).random((5, 12)) < 0.5)
    pred = scorer.predict_subsets(masks, scores)
    X, y = task.train_data()["x"].numpy(), task.train_data()["y"].numpy()
    Xq, yq = queries["x"].numpy(), queries["y"].numpy()
    full = mse(ridge(X, y, np.ones(12, bool), 0.05), Xq, yq)
    want = np.stack([mse(ridge(X, y, m, 0.05), Xq, yq) - full for m in masks.numpy()])
    # float64 closed form on both sides: 1e-9 absolute.
    np.testing.assert_allclose(pred.numpy(), want, atol=1e-9, rtol=0)
    assert pred.shape == (5, 3)


def test_predict_subsets_returns_the_suites_oracle():
    scorer = scorer_for({})
    assert ExactRetrainingScorer.uses_oracle is True
    oracle = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    out = scorer.predict_subsets(
        torch.ones(3, 4, dtype=torch.bool), torch.zeros(4, 2), oracle=oracle
    )
    assert torch.equal(out, oracle)


def test_predict_subsets_errors():
    scorer = scorer_for({})
    scores = torch.zeros(4, 2)
    with pytest.raises(DataError, match=r"masks mismatch: expected \(M, 4\)"):
        scorer.predict_subsets(torch.ones(3, 5, dtype=torch.bool), scores, oracle=torch.zeros(3, 2))
    with pytest.raises(DataError, match=r"oracle mismatch: expected \(3, 2\)"):
        scorer.predict_subsets(torch.ones(3, 4, dtype=torch.bool), scores, oracle=torch.zeros(2, 2))
    with pytest.raises(ConfigError, match="call scores\\(\\) first or pass oracle="):
        scorer.predict_subsets(torch.ones(3, 4, dtype=torch.bool), scores)


@pytest.mark.parametrize(
    ("indices", "message"),
    [([0, 20], r"out-of-range \[20\]"), ([1, 1], "duplicates")],
)
def test_bad_indices(indices, message, tmp_path):
    cfg = {
        "task": LINREG,
        "target": "mse",
        "methods": [{"name": "exact-retraining", "indices": indices}],
    }
    code, output = run_attribute(cfg, tmp_path / "out")
    assert code == 2, output
    assert "indices: expected distinct training indices in 0..19" in output
    with pytest.raises(ConfigError, match=message):
        attribute(cfg)


def test_crash_between_models_then_resume_recomputes_nothing_finished(counting_task, tmp_path):
    task = counting_task
    queries = task.make_queries(None, 3, seed=2)
    options = {"indices": list(range(9)), "seeds": 1, "models_per_job": 2}
    # 10 models (full + 9 LOO) in 5 jobs of 2; the "process" dies after 3 jobs = 6 models.
    ctx = ScoringContext(target=SquaredError(), cache_dir=str(tmp_path), executor=CrashAfter(3))
    with pytest.raises(SimulatedCrashError):
        scorer_for(options).scores(task, None, queries, ctx)
    assert CountingLinearRegression.train_calls == 6
    stored = sorted(p.name for p in (tmp_path / "retrain").rglob("seed*.npy"))
    assert len(stored) == 6 and not list((tmp_path / "retrain").rglob(".*tmp*"))

    CountingLinearRegression.train_calls = 0
    ctx = ScoringContext(target=SquaredError(), cache_dir=str(tmp_path))
    scorer = scorer_for(options)
    resumed = scorer.scores(task, None, queries, ctx)
    assert CountingLinearRegression.train_calls == 4  # only the 4 unfinished models
    assert ctx.info["exact_retraining"]["models_reused"] == 6

    CountingLinearRegression.train_calls = 0
    fresh = scorer_for(options).scores(task, None, queries, ScoringContext(target=SquaredError()))
    assert CountingLinearRegression.train_calls == 10  # no store: everything trained
    torch.testing.assert_close(resumed, fresh, rtol=0, atol=0, equal_nan=True)

    CountingLinearRegression.train_calls = 0
    scorer_for(options).scores(
        task, None, queries, ScoringContext(target=SquaredError(), cache_dir=str(tmp_path))
    )
    assert CountingLinearRegression.train_calls == 0  # everything finished: nothing retrained


def test_subset_oracle_resumes_too(counting_task, tmp_path):
    task = counting_task
    queries = task.make_queries(None, 2, seed=2)
    masks = torch.as_tensor(np.random.default_rng(1).random((4, 12)) < 0.5)
    ctx = ScoringContext(target=SquaredError(), cache_dir=str(tmp_path))
    scorer = scorer_for({"indices": [0]})
    scores = scorer.scores(task, None, queries, ctx)
    first = scorer.predict_subsets(masks, scores)
    CountingLinearRegression.train_calls = 0
    again = scorer.predict_subsets(masks, scores)
    assert CountingLinearRegression.train_calls == 0
    assert torch.equal(first, again)


@pytest.mark.slow
def test_ray_executor_gives_the_local_result():
    """Jobs are self-contained and picklable: a Ray worker computes the same bits."""
    task = get_registry().create("task", "linear-regression", n_train=12, dim=3)
    queries = task.make_queries(None, 3, seed=0)
    ray = get_registry().create("executor", "ray", num_cpus=1, shutdown=True)
    on_ray = scorer_for({"models_per_job": 4}).scores(
        task, None, queries, ScoringContext(target=SquaredError(), executor=ray)
    )
    local = scorer_for({"models_per_job": 4}).scores(
        task, None, queries, ScoringContext(target=SquaredError())
    )
    torch.testing.assert_close(on_ray, local, rtol=0, atol=0)


def test_empty_indices_train_nothing(counting_task):
    """``indices: []`` (bench reads the suite's oracle): all rows NaN, no model trained."""
    task = counting_task
    scorer = scorer_for({"indices": []})
    queries = task.make_queries(None, 2, seed=0)
    scores = scorer.scores(task, None, queries, ScoringContext(target=SquaredError()))
    assert CountingLinearRegression.train_calls == 0 and torch.isnan(scores).all()
    oracle = torch.ones(3, 2, dtype=torch.float64)
    assert torch.equal(
        scorer.predict_subsets(torch.ones(3, 12, dtype=torch.bool), scores, oracle=oracle), oracle
    )
