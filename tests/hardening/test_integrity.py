"""suite.json records sha256 of every array; bench refuses a truncated, edited or missing file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import LIN

from attribution_core import integrity
from attribution_core.integrity import sha256_file
from attribution_core.pipeline import attribute
from attribution_core.testing import run_cli, write_config


@pytest.fixture
def suite(lin_suite: Path, tmp_path: Path) -> Path:
    """A private copy of the built suite (tests edit it)."""
    return Path(shutil.copytree(lin_suite, tmp_path / "suite"))


def _bench(suite: Path, tmp_path: Path, *args: str) -> tuple[int, str]:
    cfg = write_config(tmp_path / "bench.yaml", {**LIN, "evaluation": {"suite": str(suite)}})
    return run_cli("bench", str(cfg), "--out", str(tmp_path / "out"), "--quiet", *args)


def test_suite_json_records_every_array(suite: Path) -> None:
    files = json.loads((suite / "suite.json").read_text())["files"]
    assert {"masks.npy", "base/model.safetensors", "truth/mse.npy", "oracle/mse.npy"} <= set(files)
    assert not any(f.startswith("runs/") for f in files)
    for rel, rec in files.items():
        assert rec == {"size": (suite / rel).stat().st_size, "sha256": sha256_file(suite / rel)}


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete"])
def test_bench_refuses_a_damaged_suite(suite: Path, tmp_path: Path, damage: str) -> None:
    target = suite / "truth" / "mse.npy"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "edit":  # same size, one byte changed
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        target.unlink()
    code, text = _bench(suite, tmp_path)
    assert code == 2, text
    word = {"truncate": "is truncated", "edit": "was modified", "delete": "is missing"}[damage]
    assert f"'{target}' {word}" in text and "Traceback" not in text
    assert not (tmp_path / "out" / "lds.csv").exists()
    code, text = run_cli("suite", "verify", str(suite))
    assert code == 2 and str(target) in text


def test_hashes_are_checked_once_per_file(
    suite: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, text = _bench(suite, tmp_path)
    assert code == 0, text
    calls: list[Path] = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: calls.append(Path(p)) or real(p))
    code, text = _bench(suite, tmp_path)
    assert code == 0, text
    assert not [c for c in calls if suite in c.parents]  # cached by path, size and mtime
    cache = json.loads(Path(integrity.cache_path()).read_text())
    assert str((suite / "masks.npy").resolve()) in cache
    assert not list(suite.rglob("*hash*"))  # the cache lives outside the suite


def test_verify_write_migrates_a_suite_without_hashes(suite: Path, tmp_path: Path) -> None:
    meta = json.loads((suite / "suite.json").read_text())
    del meta["files"]
    (suite / "suite.json").write_text(json.dumps(meta))
    code, text = _bench(suite, tmp_path)
    assert code == 2 and "suite verify" in text and "--write" in text, text
    code, text = run_cli("suite", "verify", str(suite), "--write")
    assert code == 0 and "files recorded" in text, text
    code, text = run_cli("suite", "verify", str(suite))
    assert code == 0 and "files verified" in text, text
    assert _bench(suite, tmp_path)[0] == 0


def test_verify_reports_an_unrecorded_file(suite: Path) -> None:
    np.save(suite / "truth" / "extra.npy", np.zeros(3))
    code, text = run_cli("suite", "verify", str(suite))
    assert code == 2 and "extra.npy' is not recorded" in text


def test_attribute_manifest_hashes_and_a_damaged_result_is_recomputed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    attribute(LIN, out=out)
    scores = out / "grad-dot" / "scores.npy"
    manifest = json.loads((out / "grad-dot" / "manifest.json").read_text())
    assert manifest["files"]["scores.npy"]["sha256"] == sha256_file(scores)
    good = np.load(scores)
    data = scores.read_bytes()
    scores.write_bytes(data[:-4] + b"\0\0\0\0")  # edited in place
    again = attribute(LIN, out=out)
    assert again.methods["grad-dot"] is not None  # recomputed, not reused
    assert np.array_equal(np.load(scores), good)
    assert attribute(LIN, out=out).methods["grad-dot"] is None  # intact now: reused
