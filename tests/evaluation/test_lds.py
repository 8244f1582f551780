"""LDS and suite statistics, recomputed independently with scipy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from attribution_core.evaluation import lds as L


def test_lds_csv_matches_independent_scipy_spearman(lin_bench, lin_suite) -> None:
    suite, _ = lin_suite
    table = pd.read_csv(lin_bench / "lds.csv")
    truth = np.load(suite / "truth" / "mse.npy")  # (M, S, Q)
    assert list(table.columns) == [
        "label",
        "method",
        "target",
        "damping",
        "lds_mean",
        "lds_stderr",
        "lds_ci_low",
        "lds_ci_high",
        "n_queries",
        "seconds",
        "protocol",
        "lds_cross_seed",
        "lds_cross_seed_stderr",
        "lds_cross_masks",
    ]
    # issue 17: the protocol is recorded; cross-seed columns are empty where not measured
    assert set(table["protocol"]) == {"distributional"}
    assert table[["lds_cross_seed", "lds_cross_seed_stderr", "lds_cross_masks"]].isna().all().all()
    for _, row in table.iterrows():
        pred = np.load(lin_bench / row["label"] / "predictions.npy")
        per_q = [
            stats.spearmanr(pred[:, q], truth[:, :, q].mean(axis=1))[0]
            for q in range(truth.shape[2])
        ]
        # float64 statistics of the same numbers: only summation order differs
        assert row["lds_mean"] == pytest.approx(np.mean(per_q), abs=1e-12)
        assert row["lds_stderr"] == pytest.approx(
            np.std(per_q, ddof=1) / np.sqrt(len(per_q)), abs=1e-12
        )
        assert row["n_queries"] == truth.shape[2]
        assert row["lds_ci_low"] <= row["lds_ci_high"]


def test_predictions_are_additive_removed_sum(lin_bench, lin_suite) -> None:
    suite, _ = lin_suite
    masks = np.load(suite / "masks.npy")
    scores = np.load(lin_bench / "grad-dot" / "scores.npy").astype(np.float64)
    pred = np.load(lin_bench / "grad-dot" / "predictions.npy")
    # paper eq. 6: (1/N) Σ_{removed} score_j; scores were stored as float32
    np.testing.assert_allclose(pred, (~masks).astype(float) @ scores / masks.shape[1], rtol=1e-6)


def test_spearman_columns_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(30, 5)).astype(float)  # many ties
    b = rng.normal(size=(30, 5))
    expected = [stats.spearmanr(a[:, q], b[:, q])[0] for q in range(5)]
    np.testing.assert_allclose(L.spearman_columns(a, b), expected, atol=1e-12)


def test_reliability_two_seeds_is_spearman_brown_of_seed_correlation() -> None:
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(50, 1, 4))
    truth = signal + 0.7 * rng.normal(size=(50, 2, 4))
    r = np.mean([stats.spearmanr(truth[:, 0, q], truth[:, 1, q])[0] for q in range(4)])
    out = L.reliability(truth)
    assert out["split_seed_r"] == pytest.approx(r, abs=1e-12)
    assert out["reliability"] == pytest.approx(2 * r / (1 + r), abs=1e-9)  # Spearman–Brown, k = 2


def test_reliability_variance_ratio_recovers_components() -> None:
    # between-subset σ² = 4, between-seed σ² = 1 → ratio 4, share 0.8 (large sample; 10 % tolerance)
    rng = np.random.default_rng(2)
    truth = 2.0 * rng.normal(size=(4000, 1, 3)) + rng.normal(size=(4000, 4, 3))
    out = L.reliability(truth)
    assert out["variance_ratio"] == pytest.approx(4.0, rel=0.1)
    assert out["subset_share"] == pytest.approx(0.8, rel=0.05)
    assert 0.9 < out["reliability"] <= 1.0  # 4 seeds of a 0.8-reliable unit: 16/17 ≈ 0.94


def test_null_lds_is_centred_on_zero() -> None:
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(40, 2, 6))
    masks = rng.random((40, 30)) < 0.5
    null = L.null_lds(truth, masks, n_draws=300)
    # mean of 300 draws of a mean of 6 Spearmans over 40 points: s.e. ≈ 0.16/√6/√300 ≈ 0.004
    assert abs(null["mean"]) < 0.03
    assert null["p95"] > null["mean"]


def test_pairwise_is_antisymmetric_and_flags_resolved() -> None:
    rng = np.random.default_rng(4)
    truth = rng.normal(size=(60, 2, 5))
    signal = truth.mean(axis=1)
    idx = L.bootstrap_indices(60, 300)
    good = L.summarize(signal + 0.1 * rng.normal(size=signal.shape), truth, idx)
    bad = L.summarize(rng.normal(size=signal.shape), truth, idx)
    rows = L.pairwise(
        {"good": good["boot"], "bad": bad["boot"]},
        {"good": good["lds_mean"], "bad": bad["lds_mean"]},
    )
    by = {(r["a"], r["b"]): r for r in rows}
    assert by[("good", "bad")]["diff"] == pytest.approx(-by[("bad", "good")]["diff"])
    assert by[("good", "bad")]["resolved"] and by[("good", "bad")]["ci_low"] > 0


def test_predictions_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="predictions mismatch"):
        L.lds_per_query(np.zeros((3, 2)), np.zeros((4, 2, 2)))
