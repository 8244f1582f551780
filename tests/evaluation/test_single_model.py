"""Single-model protocol of suites, bench and counterfactual (issue 17, acceptance 2 and 4).

A tiny ``ddpm-digits`` suite (width 8, 30 steps, 10 subsets at α = 0.9, one cross seed) is built
and benched through the CLI; the test recomputes ``lds_cross_seed``, ``lds_cross_masks`` and the
split-draw ceiling independently (scipy) from the saved predictions and the suite's arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from attribution_core import ConfigError, single_model_weights, train_single_model
from attribution_core.evaluation.runs import load_query_batch, measure_split
from attribution_core.evaluation.single import check_single_model, cross_seed_pairs
from attribution_core.evaluation.suite import draw_masks, kept_count
from attribution_core.interfaces import Scorer
from attribution_core.registry import get_registry
from attribution_core.testing import run_cli, write_config

pytestmark = pytest.mark.skipif(
    "ddpm-digits" not in get_registry().names("task"), reason="diffusion plugin not installed"
)

TASK = {
    "name": "ddpm-digits",
    "classes": [0, 1],
    "n_train": 40,
    "width": 8,
    "channel_mult": [1],
    "T": 50,
    "train_steps": 30,
    "batch_size": 16,
}
TARGET = {"name": "loss", "n_samples": 256}
SINGLE = {
    "task": TASK,
    "queries": {"source": "generated", "count": 3, "seed": 0},
    "methods": ["grad-dot", "exact-retraining"],
    "target": TARGET,
    "evaluation": {
        "lds": {
            "protocol": "single-model",
            "subsets": 10,
            "kept_fraction": 0.9,
            "cross_seeds": 1,
            "batch": 4,
        },
        "counterfactual": {"remove_fraction": 0.1, "queries": 2},
    },
}
TID = "loss-n_samples256"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(config, suite, bench output)``: suite built and benched through the CLI."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("single")
    suite = root / "suite"
    config = write_config(
        root / "single.yaml",
        {**SINGLE, "evaluation": {**SINGLE["evaluation"], "suite": str(suite)}},
    )
    code, output = run_cli("suite", "build", str(config), "--out", str(suite), "--quiet")
    assert code == 0, output
    assert "split-draw r" in output
    code, output = run_cli("bench", str(config), "--out", str(root / "bench"), "--quiet")
    assert code == 0, output
    return config, suite, root / "bench"


def _spearman_mean(pred: np.ndarray, truth: np.ndarray) -> tuple[float, np.ndarray]:
    per_q = np.array([stats.spearmanr(pred[:, q], truth[:, q])[0] for q in range(pred.shape[1])])
    return float(per_q.mean()), per_q


def test_bench_columns_and_ceiling_recomputed_independently(built) -> None:
    _, suite, out = built
    meta = json.loads((suite / "suite.json").read_text())
    assert meta["protocol"] == "single-model" and meta["seeds"]["oracle"] is None
    assert not (suite / "oracle").exists()  # no oracle runs under single-model
    table = pd.read_csv(out / "lds.csv")
    assert set(table["protocol"]) == {"single-model"}
    truth = np.load(suite / "truth" / f"{TID}.npy")  # (M, 1, Q)
    halves = np.load(suite / "truth" / f"{TID}.halves.npy")  # (M, 2, Q)
    cross = np.load(suite / "cross" / f"{TID}.npy")  # (M', K, Q)
    assert truth.shape[1] == 1 and cross.shape[:2] == (10, 1)
    # the truth is the mean of all 2S draws = the mean of the two S-draw halves
    np.testing.assert_allclose(truth[:, 0], halves.mean(axis=1), rtol=1e-12)
    for _, row in table.iterrows():
        pred = np.load(out / row["label"] / "predictions.npy")
        lds, _ = _spearman_mean(pred, truth[:, 0])
        assert row["lds_mean"] == pytest.approx(lds, abs=1e-12)
        m = cross.shape[0]
        cross_lds, per_q = _spearman_mean(pred[:m], cross.mean(axis=1))
        assert row["lds_cross_seed"] == pytest.approx(cross_lds, abs=1e-12)
        assert row["lds_cross_seed_stderr"] == pytest.approx(
            per_q.std(ddof=1) / np.sqrt(len(per_q)), abs=1e-12
        )
        same, _ = _spearman_mean(pred[:m], truth[:m, 0])
        assert row["lds_cross_masks"] == pytest.approx(same, abs=1e-12)
    exact = table.set_index("label").loc["exact-retraining"]
    assert exact["lds_mean"] == pytest.approx(1.0)  # by construction (the truth itself)
    # split-draw ceiling: Spearman between halves per query, Spearman–Brown to 2S, √
    r = np.mean([stats.spearmanr(halves[:, 0, q], halves[:, 1, q])[0] for q in range(3)])
    rel = 2 * r / (1 + r) if r > 0 else 0.0
    stored = meta["reliability"][TID]
    assert stored["split_draw_r"] == pytest.approx(r, abs=1e-12)
    assert stored["reliability"] == pytest.approx(rel, abs=1e-12)
    assert stored["ceiling"] == pytest.approx(np.sqrt(rel), abs=1e-12)
    bench_meta = json.loads((out / "bench.json").read_text())
    assert bench_meta["protocol"] == "single-model"
    assert bench_meta["reliability"][TID]["ceiling"] == stored["ceiling"]
    report = (out / "report.md").read_text()
    assert "Protocol: single-model" in report and "1.000 by construction" in report


def test_truth_is_the_single_model_retraining_bit_for_bit(built) -> None:
    """Subset 0's truth equals an independent single-model retraining with the base seed, and
    the cross seed's full model keeps the base initialisation but not its weights."""
    _, suite, _ = built
    reg = get_registry()
    task = reg.get("task", "ddpm-digits").factory(**{k: v for k, v in TASK.items() if k != "name"})
    masks = np.load(suite / "masks.npy")
    assert (masks.sum(axis=1) == kept_count(0.9, 40)).all()
    model = train_single_model(task, single_model_weights(torch.from_numpy(masks[0])), 0)
    target = reg.create("measurement", "loss", task, where="t", n_samples=256)
    queries = load_query_batch(suite / "queries", task)
    rows = measure_split(model, target, queries, 0)
    np.testing.assert_array_equal(rows[0], np.load(suite / "truth" / f"{TID}.npy")[0, 0])
    np.testing.assert_array_equal(rows[2:], np.load(suite / "truth" / f"{TID}.halves.npy")[0])


def test_counterfactual_single_model_is_deterministic(built, tmp_path) -> None:
    config, _, out = built
    code, output = run_cli("counterfactual", str(config), "--out", str(out), "--quiet")
    assert code == 0, output
    cf = pd.read_csv(out / "counterfactual.csv")
    assert set(cf["protocol"]) == {"single-model"} and set(cf["n_seeds"]) == {1}
    assert (cf["change_stderr"] == 0).all() and (cf["random_stderr"] == 0).all()
    assert cf["predicted_change"].notna().all()
    info = json.loads((out / "counterfactual" / "info.json").read_text())
    assert info["protocol"] == "single-model" and info["seeds"] == [0]
    # the grad-dot prediction is the additive one: (1/N) Σ of its top scores
    scores = np.load(out / "grad-dot" / "scores.npy")
    k = int(cf["removed"].iloc[0])
    for q in range(2):
        top = np.argsort(-scores[:, q], kind="stable")[:k]
        row = cf[(cf["label"] == "grad-dot") & (cf["query"] == q)].iloc[0]
        assert row["predicted_change"] == pytest.approx(scores[top, q].sum() / 40, rel=1e-6)


def test_protocol_mismatch_refused_before_work(built, lin_suite, tmp_path) -> None:
    _, suite, _ = built
    data = {**SINGLE, "evaluation": {"suite": str(suite), "lds": {"protocol": "distributional"}}}
    code, output = run_cli(
        "bench", str(write_config(tmp_path / "d.yaml", data)), "--out", str(tmp_path / "o1")
    )
    assert code == 2 and "built under the 'single-model' protocol" in output, output
    lin, lin_cfg = lin_suite
    data = {**lin_cfg, "evaluation": {"suite": str(lin), "lds": {"protocol": "single-model"}}}
    code, output = run_cli(
        "bench", str(write_config(tmp_path / "s.yaml", data)), "--out", str(tmp_path / "o2")
    )
    assert code == 2 and "built under the 'distributional' protocol" in output, output
    assert not (tmp_path / "o2" / "lds.csv").exists()


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"lds": {"cross_seeds": 1}}, "cross_seeds: 1 needs protocol: single-model"),
        (
            {"lds": {"protocol": "single-model"}, "targets": [{"name": "loss", "n_samples": 64}]},
            "loss with 64 (t, ε) draws",
        ),
        ({"lds": {"protocol": "single-model", "seeds": 3}}, "evaluation.lds.seeds: 3"),
        ({"loo": True}, "loo: true needs evaluation.lds.protocol: single-model"),
    ],
)
def test_bad_single_model_configs_exit_2_before_work(change, expect, tmp_path) -> None:
    data = {**SINGLE, "evaluation": change}
    out = tmp_path / "suite"
    code, output = run_cli(
        "suite", "build", str(write_config(tmp_path / "c.yaml", data)), "--out", str(out)
    )
    assert code == 2 and expect in output, output
    assert not (out / "suite.json").exists() and not (out / "runs").exists()


def test_task_without_the_hook_is_named(tmp_path) -> None:
    from attribution_core.config import load_config
    from attribution_core.wrap import ModuleTask

    x = torch.zeros(4, 2, dtype=torch.float64)
    task = ModuleTask(lambda seed: torch.nn.Linear(2, 1).double(), {"x": x, "y": x.sum(1)}, "mse")
    cfg = load_config({**SINGLE, "evaluation": {"lds": {"protocol": "single-model"}}})
    with pytest.raises(ConfigError, match="Task.training_recipe"):
        check_single_model(cfg, task, get_registry(), [])
    lin = {"name": "linear-regression", "n_train": 10, "dim": 2}  # closed form: no training run
    data = {
        **SINGLE,
        "task": lin,
        "target": "mse",
        "evaluation": {"lds": {"protocol": "single-model"}},
    }
    code, output = run_cli(
        "suite", "build", str(write_config(tmp_path / "l.yaml", data)), "--out", str(tmp_path / "s")
    )
    assert code == 2 and "closed-form" in output and "single-model" in output, output


def test_removed_weight_scales_the_additive_prediction() -> None:
    masks = torch.from_numpy(draw_masks(20, 5, 0.9, seed=1))
    scores = torch.randn(20, 3, dtype=torch.float64)
    base = Scorer.predict_subsets(None, masks, scores)  # type: ignore[arg-type]
    half = Scorer.predict_subsets(None, masks, scores, removed_weight=0.5)  # type: ignore[arg-type]
    torch.testing.assert_close(half, 0.5 * base)


def test_kept_fraction_keeps_exactly_floor_alpha_n() -> None:
    assert kept_count(0.57, 100) == 57  # float: 0.57 * 100 = 56.99…
    for alpha in (0.5, 0.75, 0.9, 0.99):
        for n in (40, 360, 1797):
            masks = draw_masks(n, 4, alpha, seed=0)
            assert (masks.sum(axis=1) == int(np.floor(round(alpha * n, 9)))).all()


def test_cross_seed_pairs_scope() -> None:
    from attribution_core.config import LDSConfig

    stream = LDSConfig(protocol="single-model", cross_seeds=2)
    assert cross_seed_pairs(stream, 0) == [(0, 2000), (0, 2001)]
    both = LDSConfig(protocol="single-model", cross_seeds=2, cross_seed_scope="init+stream")
    assert cross_seed_pairs(both, 2000) == [(2001, 2001), (2002, 2002)]  # never the base seed
