"""Bad input fails before any work, with one clear line (exit code 2 from the CLI)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from evalhelpers import LIN

from attribution_core.errors import ConfigError, DataError
from attribution_core.evaluation.bench import bench
from attribution_core.evaluation.suite import build_suite
from attribution_core.testing import run_cli, write_config


def _cfg(suite, **changes):
    data = json.loads(json.dumps(LIN))
    data["evaluation"] = {"suite": str(suite)}
    data.update(changes)
    return data


def test_masks_not_matching_training_size(lin_suite, tmp_path) -> None:
    suite, _ = lin_suite
    cfg = _cfg(suite, task={"name": "linear-regression", "n_train": 30, "dim": 4})
    with pytest.raises(DataError, match=r"masks.npy .* has shape \(12, 40\), but the task has 30"):
        bench(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing done


def test_target_not_in_suite(lin_suite, tmp_path) -> None:
    suite, _ = lin_suite
    with pytest.raises(ConfigError, match=r"target: 'loss' is not held by suite .* it holds mse"):
        bench(_cfg(suite, target="loss"), tmp_path / "out")


def test_suite_does_not_exist(tmp_path) -> None:
    with pytest.raises(
        DataError, match=r"evaluation.suite: .*nope.* is not a suite \(no suite.json\)"
    ):
        bench(_cfg(tmp_path / "nope"), tmp_path / "out")


def test_no_suite_given(tmp_path) -> None:
    cfg = _cfg("x")
    cfg["evaluation"] = {}
    with pytest.raises(ConfigError, match="evaluation.suite: no suite given"):
        bench(cfg, tmp_path / "out")


def test_lds_block_conflicting_with_suite(lin_suite, tmp_path) -> None:
    suite, _ = lin_suite
    cfg = _cfg(suite)
    cfg["evaluation"]["lds"] = {"subsets": 6}
    with pytest.raises(
        ConfigError, match=r"evaluation.lds.subsets: 6 conflicts with suite .*subsets=12"
    ):
        bench(cfg, tmp_path / "out")
    cfg["evaluation"]["lds"] = {"subsets": 12, "seeds": 2}  # restating the suite's settings is fine
    from attribution_core.config import load_config
    from attribution_core.evaluation.bench import prepare

    prepare(load_config(cfg), tmp_path / "ok")


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.5, -0.2])
def test_kept_fraction_outside_unit_interval(alpha, tmp_path, lin_suite) -> None:
    _, cfg = lin_suite
    data = json.loads(json.dumps(cfg))
    data["evaluation"]["lds"]["kept_fraction"] = alpha
    with pytest.raises(ConfigError, match="evaluation.lds.kept_fraction"):
        build_suite(data, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_incomplete_suite_is_refused(lin_suite, tmp_path) -> None:
    suite, _ = lin_suite
    copy = tmp_path / "copy"
    shutil.copytree(suite, copy)
    meta = json.loads((copy / "suite.json").read_text())
    meta["status"] = "building"
    (copy / "suite.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="is incomplete"):
        bench(_cfg(copy), tmp_path / "out")


def test_other_config_in_existing_suite_dir(lin_suite, tmp_path) -> None:
    _, cfg = lin_suite
    data = json.loads(json.dumps(cfg))
    data["evaluation"]["lds"].update(subsets=2, seeds=1)
    build_suite(data, tmp_path / "s")
    data["seed"] = 5
    with pytest.raises(ConfigError, match="holds a suite built from another config"):
        build_suite(data, tmp_path / "s")


def test_task_describing_another_training_run(lin_suite, tmp_path) -> None:
    """bench and a resumed build compare the config's task description with the suite's."""
    suite, cfg = lin_suite
    other = {"name": "linear-regression", "n_train": 40, "dim": 4, "ridge": 0.5}
    with pytest.raises(ConfigError, match=r"another training run .*ridge: config 0.5, suite 0.01"):
        bench(_cfg(suite, task=other), tmp_path / "out")
    data = json.loads(json.dumps(cfg))
    data["evaluation"]["lds"].update(subsets=2, seeds=1)
    build_suite(data, tmp_path / "s")
    data["task"] = other
    with pytest.raises(ConfigError, match=r"--set task.ridge=0.01"):
        build_suite(data, tmp_path / "s")


def test_recipe_keys_absent_from_a_suite_record_mean_the_description_baseline(tmp_path) -> None:
    """A suite recorded before ddpm-digits' default became adam_eps 1e-2 (no recipe keys in its
    task record) matches an explicit 1e-8 and refuses the new default, naming the fix."""
    from attribution_diffusion.task import DDPMDigitsTask

    from attribution_core.evaluation.suite_checks import check_task

    tiny = {"n_train": 6, "T": 20, "width": 4, "train_steps": 3, "batch_size": 4}
    legacy = DDPMDigitsTask(adam_eps=1e-8, **tiny)
    meta = {"task": legacy.describe(), "config": {"task": {"name": "ddpm-digits", **tiny}}}
    assert "adam_eps" not in meta["task"]
    check_task(meta, tmp_path, legacy)
    with pytest.raises(ConfigError, match=r"adam_eps: config 0.01, suite 1e-08.*adam_eps=1e-08"):
        check_task(meta, tmp_path, DDPMDigitsTask(**tiny))
    newer = dict(meta, task={k: v for k, v in meta["task"].items() if k != "cycle"})
    check_task(newer, tmp_path, legacy)  # an option newer than the suite is not compared


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"target": "loss"}, "not held by suite"),
        ({"task": {"name": "linear-regression", "n_train": 30, "dim": 4}}, "masks.npy"),
        ({"evaluation": {"suite": "/nonexistent/suite"}}, "is not a suite"),
    ],
)
def test_cli_exit_code_2(lin_suite, tmp_path, changes, match) -> None:
    suite, _ = lin_suite
    cfg = _cfg(suite)
    cfg.update(changes)
    path = write_config(tmp_path / "c.yaml", cfg)
    code, output = run_cli("bench", str(path), "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2, output
    assert match in output and "Traceback" not in output


def test_cli_suite_build_kept_fraction_exit_2(lin_suite, tmp_path) -> None:
    _, cfg = lin_suite
    path = write_config(tmp_path / "c.yaml", cfg)
    code, output = run_cli(
        "suite",
        "build",
        str(path),
        "--out",
        str(tmp_path / "s"),
        "--set",
        "evaluation.lds.kept_fraction=1.2",
        "--quiet",
    )
    assert code == 2 and "kept_fraction" in output


def test_topk_errors(lin_bench, tmp_path) -> None:
    code, output = run_cli("topk", str(lin_bench), "--query", "99")
    assert code == 2 and "out of range" in output
    code, output = run_cli("topk", str(tmp_path), "--query", "0")
    assert code == 2 and "holds no <label>/scores.npy" in output
    code, output = run_cli("report", str(tmp_path))
    assert code == 2 and "has no bench.json" in output
    assert np.load(lin_bench / "grad-dot" / "scores.npy").shape == (40, 5)


def test_config_without_task_is_refused(lin_suite, tmp_path) -> None:
    _, cfg = lin_suite
    data = json.loads(json.dumps(cfg))
    del data["task"]
    with pytest.raises(ConfigError, match="task: suites and benches rebuild the task"):
        build_suite(data, tmp_path / "s")
