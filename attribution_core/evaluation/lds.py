"""Linear data-modelling score (LDS) and the statistics around it.

* LDS for query ``q``: Spearman over subsets between ``predictions[:, q]`` and
  ``truth[:, :, q].mean(axis=1)``; reported as mean ± standard error over queries.
* 95 % interval: bootstrap over subsets (queries kept), percentile method.
* Pairwise differences: the same bootstrap resamples for every method (paired).
* Null: LDS of random Gaussian scores (additive predictions), mean and 95th percentile.
* Reliability: split-seed Spearman (seed k vs the mean of the other seeds), corrected with
  Spearman–Brown to the reliability of the S-seed mean, and the between-subset / between-seed
  variance ratio.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import optimize, stats


def _rank(a: np.ndarray) -> np.ndarray:
    return stats.rankdata(a, axis=0)


def _columnwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / den
    return np.where(den > 0, r, 0.0)


def spearman_columns(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """``(M, Q), (M, Q) -> (Q,)`` Spearman per column (average ranks; constant column → 0)."""
    return _columnwise_corr(_rank(pred), _rank(actual))


def lds_per_query(predictions: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``predictions (M, Q)``, ``truth (M, S, Q)`` → ``(Q,)`` LDS per query."""
    if predictions.shape != (truth.shape[0], truth.shape[2]):
        raise ValueError(
            f"predictions mismatch: expected {(truth.shape[0], truth.shape[2])} (subsets, queries), "
            f"got {predictions.shape}"
        )
    return spearman_columns(predictions, truth.mean(axis=1))


LDS_COLUMNS = (
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
)
"""The columns of ``lds.csv``, in order (the report shows them all but ``target``).

``protocol`` is the suite's (``distributional`` or ``single-model``); ``lds_cross_seed`` (± its
``_stderr`` over queries) is the LDS against the truth retrained under the suite's other seeds
(single-model suites with ``cross_seeds``) and ``lds_cross_masks`` the same-seed LDS on the same
masks (the first 32), so the two compare; all three are empty where not measured."""


def bootstrap_indices(n_subsets: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``(n_boot, M)`` subset indices drawn with replacement (shared by all methods: paired)."""
    return np.random.default_rng([seed, 11]).integers(0, n_subsets, size=(n_boot, n_subsets))


def bootstrap_lds(predictions: np.ndarray, truth: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``(n_boot,)`` mean-over-queries LDS on each bootstrap resample of subsets."""
    mean_truth = truth.mean(axis=1)
    return np.array([spearman_columns(predictions[i], mean_truth[i]).mean() for i in idx])


def summarize(predictions: np.ndarray, truth: np.ndarray, idx: np.ndarray) -> dict[str, Any]:
    """LDS mean, stderr over queries, bootstrap 95 % interval, per-query values, resamples."""
    per_q = lds_per_query(predictions, truth)
    boot = bootstrap_lds(predictions, truth, idx)
    q = per_q.shape[0]
    return {
        "lds_mean": float(per_q.mean()),
        "lds_stderr": float(per_q.std(ddof=1) / np.sqrt(q)) if q > 1 else float("nan"),
        "lds_ci_low": float(np.percentile(boot, 2.5)),
        "lds_ci_high": float(np.percentile(boot, 97.5)),
        "n_queries": int(q),
        "per_query": per_q,
        "boot": boot,
    }


def pairwise(boots: dict[str, np.ndarray], means: dict[str, float]) -> list[dict[str, Any]]:
    """Each method minus each other: difference, paired-bootstrap 95 % CI, resolved or not."""
    rows = []
    labels = list(boots)
    for a in labels:
        for b in labels:
            if a == b:
                continue
            d = boots[a] - boots[b]
            lo, hi = np.percentile(d, [2.5, 97.5])
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "diff": means[a] - means[b],
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                    "resolved": bool(lo > 0 or hi < 0),
                }
            )
    return rows


def null_lds(
    truth: np.ndarray, masks: np.ndarray, n_draws: int = 200, seed: int = 0
) -> dict[str, float]:
    """LDS of random ``N(0, 1)`` scores with additive predictions: mean and 95th percentile."""
    rng = np.random.default_rng([seed, 13])
    removed = (~masks).astype(np.float64)
    mean_truth = truth.mean(axis=1)
    vals = np.empty(n_draws)
    for i in range(n_draws):
        scores = rng.standard_normal((masks.shape[1], truth.shape[2]))
        vals[i] = spearman_columns(removed @ scores, mean_truth).mean()
    return {"mean": float(vals.mean()), "p95": float(np.percentile(vals, 95)), "n_draws": n_draws}


def spearman_brown(r: float, k: float) -> float:
    """Reliability of a ``k``-fold longer measure given reliability ``r`` of one unit."""
    return k * r / (1 + (k - 1) * r)


def single_seed_reliability(r_split: float, n_seeds: int) -> float:
    """``ρ₁`` such that corr(one seed, mean of the other S−1) = √(ρ₁ · ρ_{S−1}) = ``r_split``."""
    if r_split <= 0:
        return 0.0
    if r_split >= 1:
        return 1.0
    k = n_seeds - 1

    def f(rho: float) -> float:
        return np.sqrt(rho * spearman_brown(rho, k)) - r_split

    return float(optimize.brentq(f, 0.0, 1.0))


def reliability(truth: np.ndarray) -> dict[str, float]:
    """Split-seed reliability and variance ratio of a suite's ``truth: (M, S, Q)``.

    Returns:
        ``split_seed_r``: mean over seeds k and queries of Spearman(seed k, mean of the others);
        ``reliability``: Spearman–Brown-corrected reliability of the S-seed mean (the truth LDS
        uses); ``ceiling``: √reliability, the expected LDS of a perfect predictor of the
        infinite-seed mean; ``variance_ratio``: between-subset variance component / between-seed
        variance (median over queries); ``subset_share``: σ²_subset / (σ²_subset + σ²_seed).
    """
    m, s, q = truth.shape
    out: dict[str, float] = {"n_subsets": m, "n_seeds": s, "n_queries": q}
    within = truth.var(axis=1, ddof=1).mean(axis=0) if s > 1 else np.full(q, np.nan)  # (Q,)
    between = truth.mean(axis=1).var(axis=0, ddof=1)  # (Q,)
    comp = np.maximum(between - within / s, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one seed: no within-subset variance
        out["variance_ratio"] = float(np.nanmedian(comp / within))
        out["subset_share"] = float(np.nanmedian(comp / (comp + within)))
    if s < 2:
        out.update(split_seed_r=float("nan"), reliability=float("nan"), ceiling=float("nan"))
        return out
    rs = [
        spearman_columns(truth[:, k], np.delete(truth, k, axis=1).mean(axis=1)).mean()
        for k in range(s)
    ]
    r = float(np.mean(rs))
    rho1 = single_seed_reliability(r, s)
    rel = spearman_brown(rho1, s) if rho1 > 0 else 0.0
    out.update(
        split_seed_r=r,
        single_seed_reliability=rho1,
        reliability=float(rel),
        ceiling=float(np.sqrt(rel)),
    )
    return out


def split_draw_reliability(halves: np.ndarray) -> dict[str, float]:
    """Split-draw reliability of a single-model suite's truth from ``halves: (M, 2, Q)``.

    Each model's target is measured on ``2S`` draws with common random numbers; ``halves[:, h]``
    is the mean over half ``h`` (S draws). ``split_draw_r`` = Spearman across subsets between
    the halves, per query, averaged over queries; ``reliability`` = its Spearman–Brown
    correction to ``2S`` draws (the truth's), ``2r / (1 + r)``; ``ceiling`` = √reliability, the
    expected LDS of a perfect predictor of the infinite-draw truth (as in :func:`reliability`).
    A deterministic target has identical halves: reliability 1. NaN halves (one draw): NaN.
    """
    m, _, q = halves.shape
    out: dict[str, float] = {"n_subsets": m, "n_seeds": 1, "n_queries": q}
    if not np.isfinite(halves).all():
        out.update(split_draw_r=float("nan"), reliability=float("nan"), ceiling=float("nan"))
        return out
    r = float(spearman_columns(halves[:, 0], halves[:, 1]).mean())
    rel = spearman_brown(r, 2) if r > 0 else 0.0
    out.update(split_draw_r=r, reliability=float(rel), ceiling=float(np.sqrt(rel)))
    return out
