"""``attribution metasmoothness`` (issue 18, "smoothness first").

* the Def. 2 score formula on a hand-computed example;
* linear-regression with ``solver: gd`` and plain SGD trains a polynomial in the weights, so
  its final parameters are smooth: score 1 up to float64 round-off (tolerance 1e-12) at
  h = 1e-1, 1e-2, 1e-3, and the central differences converge to the reverse-mode metagradient;
* the command writes ``OUT/metasmoothness.json`` and prints the tables; a task without the
  training-step hook, a closed-form solver and bad step sizes exit 2 naming the problem.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from attribution_supervised.linear_regression import LinearRegressionTask

from attribution_core import ConfigError
from attribution_core.evaluation.metasmoothness import (
    def2_scores,
    metasmoothness,
    pick_pairs,
    smoothness_score,
)
from attribution_core.testing import LINEAR_GD_TASK, linear_module_task, run_cli, write_config

LINEAR_GD = LINEAR_GD_TASK
CONFIG = {
    "task": LINEAR_GD,
    "dtype": "float64",
    "methods": ["metagradient"],
    "queries": {"source": "generated", "count": 3},
    "target": "loss",
}


def test_score_formula_hand_computed():
    theta0 = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    theta_h = torch.tensor([1.0, -1.0, 1.0, 0.5, 1.0])
    theta_2h = torch.tensor([2.0, -3.0, 0.5, 1.0, 1.0])
    # d = |θ_2h − θ₀| = [2, 3, 0.5, 1, 0], Σd = 6.5
    # sign(θ_h − θ₀) = [+, −, +, +, 0];  sign(θ_2h − θ_h) = [+, −, −, +, 0]
    # score = (2·1 + 3·1 + 0.5·(−1) + 1·1 + 0) / 6.5 = 5.5 / 6.5
    assert smoothness_score(theta0, theta_h, theta_2h) == pytest.approx(5.5 / 6.5, abs=1e-15)
    assert smoothness_score(theta0, theta_h, 2 * theta_h - theta0) == 1.0  # straight line
    halfway_back = theta0 + 0.5 * (theta_h - theta0)  # every moving coordinate turns back
    assert smoothness_score(theta0, theta_h, halfway_back) == -1.0
    assert math.isnan(smoothness_score(theta0, theta_h, theta0))  # nothing moved


def test_linear_regression_sgd_is_smooth():
    task = LinearRegressionTask(n_train=25, dim=3, solver="gd", steps=15)  # sgd, float64
    rows = def2_scores(task, 0, [1e-1, 1e-2, 1e-3], direction_seed=0)
    for row in rows:  # a polynomial in w: every coordinate moves monotonically along v
        assert row["score"] == pytest.approx(1.0, abs=1e-12), row
    assert rows[0]["rel_change"] > rows[2]["rel_change"] > 0.0


def test_command_writes_json_and_fd_converges_to_reverse_mode(tmp_path):
    out = tmp_path / "out"
    code, text = run_cli(
        "metasmoothness",
        str(write_config(tmp_path / "c.yaml", CONFIG)),
        "--out",
        str(out),
        "--pairs",
        "2",
        "--fd-steps",
        "1e-2,1e-3",
        "--fd-steps",
        "1e-4",
    )
    assert code == 0, text
    assert "| h | Def. 2 score |" in text and "reverse mode" in text
    result = json.loads((out / "metasmoothness.json").read_text())
    assert [r["h"] for r in result["def2"]] == [1e-1, 1e-2, 1e-3]
    assert result["dtype"] == "float64" and result["direction_seed"] == 0
    assert result["recipe"]["optimizer"] == "sgd"
    assert [(p["j"], p["query"]) for p in result["pairs"]] == pick_pairs(25, 3, 2, 0)
    for pair in result["pairs"]:
        rev = pair["reverse"]
        fd = [row["value"] for row in pair["fd"]]
        assert abs(rev) > 0.0
        assert all(abs(v - rev) <= 1e-6 * abs(rev) for v in fd[1:]), (fd, rev)  # O(h²)


def test_task_without_hook_is_refused_naming_it():
    task = linear_module_task(10)
    config = {k: v for k, v in CONFIG.items() if k != "task"}
    with pytest.raises(ConfigError, match=r"metasmoothness.*training-step hook.*training_recipe"):
        metasmoothness(config, task=task)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": {**LINEAR_GD, "solver": "closed-form"}}, "solver: gd"),
        ({"model": {"path": "w.safetensors"}}, "model.path"),
    ],
)
def test_bad_input_exits_2(tmp_path, change, message):
    code, text = run_cli(
        "metasmoothness", str(write_config(tmp_path / "c.yaml", {**CONFIG, **change}))
    )
    assert code == 2 and message in text, text


def test_bad_step_sizes_exit_2(tmp_path):
    path = str(write_config(tmp_path / "c.yaml", CONFIG))
    code, text = run_cli("metasmoothness", path, "--h", "0")
    assert code == 2 and "step sizes must be > 0" in text, text
    code, text = run_cli("metasmoothness", path, "--fd-steps", "abc")
    assert code == 2 and "--fd-steps 'abc'" in text, text
