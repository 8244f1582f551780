"""The documentation builds strictly and the config reference is generated, never hand-copied."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_current():
    from attribution_core.docs_reference import render

    page = (ROOT / "docs" / "config-reference.md").read_text()
    assert page == render(), (
        "docs/config-reference.md is stale: run "
        "`python -m attribution_core.docs_reference > docs/config-reference.md`"
    )


def test_config_reference_lists_every_field():
    from attribution_core.config import RunConfig

    page = (ROOT / "docs" / "config-reference.md").read_text()
    for name in RunConfig.model_fields:
        assert f"| `{name}` |" in page


def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "index.html").is_file()
