"""Suite layout and ground truth against closed-form ridge regression (float64)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attribution_core.evaluation.suite import ORACLE_SEED, TRUTH_SEED, build_suite, draw_masks


def ridge_mse(
    X: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float, Xq: np.ndarray, yq: np.ndarray
) -> np.ndarray:
    """Independent weighted ridge fit ((1/N) X̃ᵀWX̃ + λI)θ = (1/N) X̃ᵀWy, then (yq − θᵀx̃q)²."""
    n = X.shape[0]
    Xt = np.hstack([X, np.ones((n, 1))])
    theta = np.linalg.solve(
        Xt.T @ (w[:, None] * Xt) / n + lam * np.eye(Xt.shape[1]), Xt.T @ (w * y) / n
    )
    return (yq - np.hstack([Xq, np.ones((len(Xq), 1))]) @ theta) ** 2


def _task_data(cfg):
    from attribution_core.registry import get_registry

    task = (
        get_registry()
        .get("task", "linear-regression")
        .factory(dtype=torch.float64, **{k: v for k, v in cfg["task"].items() if k != "name"})
    )
    d = task.train_data()
    return task, d["x"].numpy(), d["y"].numpy()


def test_layout_shapes_and_masks(lin_suite) -> None:
    suite, _ = lin_suite
    meta = json.loads((suite / "suite.json").read_text())
    m, s, n = 12, 2, 40
    masks = np.load(suite / "masks.npy")
    assert masks.shape == (m, n) and masks.dtype == bool
    assert (masks.sum(axis=1) == n // 2).all()  # exactly ⌊αN⌋ kept
    assert np.load(suite / "truth" / "mse.npy").shape == (m, s, 5)
    assert np.load(suite / "truth" / "mse.stderr.npy").shape == (m, s, 5)
    assert np.load(suite / "oracle" / "mse.npy").shape == (m, 5)
    assert np.load(suite / "full" / "mse.npy").shape == (s, 5)
    assert (suite / "base" / "model.safetensors").is_file()
    assert len(list((suite / "runs").glob("*.npy"))) == s + m * (s + 1)
    assert meta["status"] == "complete" and meta["command"] == "pytest"
    assert meta["seeds"]["truth"] == [TRUTH_SEED, TRUTH_SEED + 1]
    assert set(meta["reliability"]["mse"]) >= {"split_seed_r", "reliability", "variance_ratio"}


def test_truth_matches_closed_form_retraining(lin_suite) -> None:
    suite, cfg = lin_suite
    task, X, y = _task_data(cfg)
    q = np.load(suite / "queries" / "samples.npy"), np.load(suite / "queries" / "y.npy")
    masks = np.load(suite / "masks.npy")
    truth = np.load(suite / "truth" / "mse.npy")
    for m in (0, 7):
        expected = ridge_mse(X, y, masks[m].astype(float), task.l2, *q)
        # float64 closed forms, two solvers: 1e-9 relative
        np.testing.assert_allclose(truth[m, 0], expected, rtol=1e-9)
        np.testing.assert_allclose(np.load(suite / "oracle" / "mse.npy")[m], expected, rtol=1e-9)
    np.testing.assert_allclose(
        np.load(suite / "full" / "mse.npy")[1], ridge_mse(X, y, np.ones(40), task.l2, *q), rtol=1e-9
    )
    assert (np.load(suite / "truth" / "mse.stderr.npy") == 0).all()  # deterministic target


def test_downweighting_variant(tmp_path, lin_suite) -> None:
    _, cfg = lin_suite
    data = json.loads(json.dumps(cfg))
    data["evaluation"]["lds"].update(subsets=3, seeds=1, removed_weight=0.5)
    built = build_suite(data, tmp_path / "s", command="pytest")
    task, X, y = _task_data(cfg)
    q = (
        np.load(tmp_path / "s" / "queries" / "samples.npy"),
        np.load(tmp_path / "s" / "queries" / "y.npy"),
    )
    w = np.where(built.masks[1], 1.0, 0.5)
    np.testing.assert_allclose(built.truth("mse")[1, 0], ridge_mse(X, y, w, task.l2, *q), rtol=1e-9)


def test_masks_are_seeded_and_prefix_stable() -> None:
    a = draw_masks(50, 10, 0.3, seed=4)
    np.testing.assert_array_equal(a, draw_masks(50, 10, 0.3, seed=4))
    np.testing.assert_array_equal(a[:6], draw_masks(50, 6, 0.3, seed=4))  # growing keeps rows
    assert (a.sum(axis=1) == 15).all()
    assert not np.array_equal(a, draw_masks(50, 10, 0.3, seed=5))


def test_growing_a_suite_reuses_finished_runs(tmp_path, lin_suite) -> None:
    _, cfg = lin_suite
    data = json.loads(json.dumps(cfg))
    data["evaluation"]["lds"].update(subsets=3)
    build_suite(data, tmp_path / "s", command="pytest")
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s" / "runs").glob("*.npy")}
    grown = build_suite(
        data, tmp_path / "s", overrides=["evaluation.lds.subsets=5"], command="pytest"
    )
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s" / "runs").glob("*.npy")}
    assert all(after[k] == v for k, v in first.items())
    assert len(after) == 2 + 5 * 3 and grown.truth("mse").shape == (5, 2, 5)


def test_oracle_seeds_differ_from_truth_seeds() -> None:
    assert ORACLE_SEED > TRUTH_SEED + 1000


def test_monte_carlo_stderr_from_per_draw_values() -> None:
    """A noisy target: value = mean of draws, stderr = std/√S of the same draws."""
    from attribution_core.evaluation.runs import measure
    from attribution_core.interfaces import Measurement

    class Noisy(Measurement):
        n_samples = 16

        def draw(self, batch, generator):
            return {
                "e": torch.randn(
                    batch["x"].shape[0], self.n_samples, generator=generator, dtype=torch.float64
                )
            }

        def evaluate(self, forward, batch, noise):
            return (forward(batch["x"]) + noise["e"]).mean(dim=1)

    from attribution_core.gradients import example_noise

    queries = {"x": torch.arange(3, dtype=torch.float64)[:, None]}
    out = measure(lambda x: 2 * x, Noisy(), queries, seed=9)
    e = example_noise(Noisy(), queries, 9, "target", 0)["e"].numpy()
    vals = 2 * np.arange(3)[:, None] + e
    np.testing.assert_allclose(out[0], vals.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(out[1], vals.std(axis=1, ddof=1) / 4, rtol=1e-12)
    assert out.shape == (2, 3) and pytest.approx(out[0]) != out[1]
