"""Bad input exits 2 with one line naming the key/value and the valid choices (issue 3, point 5)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from attribution_core.testing import run_cli

BASE = {
    "task": {"name": "linear-regression", "n_train": 40, "dim": 3},
    "queries": {"count": 2},
    "target": "mse",
    "methods": ["grad-dot"],
}


def run(tmp_path, config, *extra):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_cli("attribute", str(path), "--out", str(tmp_path / "out"), "--quiet", *extra)


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def test_unknown_method(tmp_path):
    code, out = run(tmp_path, {**BASE, "methods": ["kfac-infuence"]})
    assert code == 2
    line = one_error_line(out)
    assert "methods[0].name" in line and "'kfac-infuence'" in line and "grad-dot" in line


def test_unknown_config_key(tmp_path):
    code, out = run(tmp_path, {**BASE, "queries": {"cout": 3}})
    assert code == 2
    line = one_error_line(out)
    assert "queries.cout: unknown key" in line and "count" in line


def test_unknown_task_option(tmp_path):
    code, out = run(tmp_path, {**BASE, "task": {"name": "linear-regression", "dims": 3}})
    assert code == 2
    assert "task.dims: unknown key" in one_error_line(out)


def test_unknown_method_override(tmp_path):
    code, out = run(tmp_path, BASE, "--set", "methods.0.dampng=0.1")
    assert code == 2
    line = one_error_line(out)
    assert "methods[0].dampng" in line and "damping" in line


def test_negative_damping(tmp_path):
    code, out = run(tmp_path, {**BASE, "methods": [{"name": "dense-influence", "damping": -1}]})
    assert code == 2
    line = one_error_line(out)
    assert "damping" in line and "greater than or equal to 0" in line and "-1" in line


def test_missing_data_file(tmp_path):
    task = {"name": "linear-regression", "path": str(tmp_path / "nope.npz")}
    code, out = run(tmp_path, {**BASE, "task": task})
    assert code == 2
    assert "nope.npz" in one_error_line(out) and "does not exist" in out


def test_missing_config_file(tmp_path):
    code, out = run_cli("attribute", str(tmp_path / "missing.yaml"), "--out", str(tmp_path))
    assert code == 2
    assert "missing.yaml" in one_error_line(out)


def test_query_train_shape_mismatch(tmp_path):
    np.savez(tmp_path / "q.npz", x=np.zeros((2, 5)), y=np.zeros(2))  # task has dim 3
    config = {**BASE, "queries": {"source": "file", "path": str(tmp_path / "q.npz")}}
    code, out = run(tmp_path, config)
    assert code == 2
    line = one_error_line(out)
    assert "'x'" in line and "(3,)" in line and "(5,)" in line


def test_nan_gradient(tmp_path):
    x = np.ones((2, 3))
    x[1, 2] = np.nan
    np.savez(tmp_path / "q.npz", x=x, y=np.zeros(2))
    config = {**BASE, "queries": {"source": "file", "path": str(tmp_path / "q.npz")}}
    code, out = run(tmp_path, config)
    assert code == 2
    line = one_error_line(out)
    assert "non-finite" in line and "example 1" in line


def test_function_only_measurement_is_not_a_target(tmp_path, registry):
    from attribution_core.config import load_config
    from attribution_core.errors import ConfigError
    from attribution_core.pipeline import resolve

    with pytest.raises(ConfigError, match="unknown measurement 'nope'; valid measurements"):
        resolve(load_config({**BASE, "target": "nope"}), registry)


def test_duplicate_labels(tmp_path):
    code, out = run(tmp_path, {**BASE, "methods": ["grad-dot", "grad-dot"]})
    assert code == 2
    assert "duplicate method labels" in one_error_line(out)
