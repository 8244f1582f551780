"""A third-party plugin, pip-installed, runs by name with no change to core (issue 3, point 4).

The plugin is the one printed in docs/writing-a-plugin.md: the test extracts its two code blocks,
so the documented example cannot rot.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing-a-plugin.md"
BIN = Path(sys.executable).parent


def doc_blocks() -> tuple[str, str]:
    text = DOC.read_text()
    toml = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    return toml, code


def test_documented_plugin_is_short():
    _, code = doc_blocks()
    assert len(code.strip().splitlines()) <= 40


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    toml, code = doc_blocks()
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        + toml
    )
    (root / "attribution_input_similarity.py").write_text(code)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, str(root)], check=True)
    yield root
    subprocess.run(
        [sys.executable, "-m", "pip", "uninstall", "-q", "-y", "attribution-input-similarity"],
        check=True,
    )


def test_installed_plugin_listed_and_runs_by_name(installed_plugin, tmp_path):
    listing = subprocess.run(
        [BIN / "attribution", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(listing.stdout)
    mine = [r for r in rows if r["plugin"] == "input_similarity"]
    assert {(r["kind"], r["name"]) for r in mine} == {
        ("scorer", "input-similarity"),
        ("method", "input-similarity"),
    }
    config = {
        "task": {"name": "linear-regression", "n_train": 30, "dim": 4},
        "queries": {"count": 3},
        "target": "mse",
        "methods": ["input-similarity"],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [
            BIN / "attribution",
            "attribute",
            tmp_path / "c.yaml",
            "--out",
            tmp_path / "out",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    scores = np.load(tmp_path / "out" / "input-similarity" / "scores.npy")
    queries = np.load(tmp_path / "out" / "queries.npz")
    # independent recomputation of the documented baseline
    from attribution_core import get_registry

    task = get_registry().create("task", "linear-regression", n_train=30, dim=4)
    x = task.train_data()["x"].numpy()
    q = queries["x"]
    expected = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
        q / np.linalg.norm(q, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)  # float32 file
