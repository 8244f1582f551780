"""``score_cache``: finished method outputs reused across output directories.

* a second ``attribute`` into another directory, same method/task/model and the same query
  *data* given as another file, restores every method from the cache: the scorer never runs, the
  scores are bitwise equal, and the restored manifest carries this run's identity (so the
  directory is reused on its own afterwards, cache gone, and seeds the cache again);
* other query data miss the cache and are scored (one more entry);
* an entry whose scores file was damaged is ignored, the method scored again, the entry repaired;
* two ``bench`` runs on one suite into two directories: the second scores nothing and writes the
  same ``lds.csv`` numbers;
* off by default: no cache directory appears.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import LIN

import attribution_core.pipeline as pipeline
from attribution_core.testing import run_attribute, run_cli, write_config


@pytest.fixture
def count_scoring(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Labels of the methods built for scoring (a restored or reused method is never built)."""
    built: list[str] = []
    real = pipeline.build_method

    def counting(spec, *args, **kwargs):
        built.append(spec.label)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(pipeline, "build_method", counting)
    return built


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def test_attribute_restores_from_the_cache_in_another_directory(
    tmp_path: Path, count_scoring: list[str]
) -> None:
    cache = tmp_path / "cache"
    cfg = {**LIN, "score_cache": str(cache)}
    code, text = run_attribute(cfg, tmp_path / "a")
    assert code == 0, text
    assert count_scoring == ["grad-dot", "dense-influence"] and len(_entries(cache)) == 2
    # the same query data, as a file at another path (what bench does with a suite's queries)
    shutil.copy(tmp_path / "a" / "queries.npz", tmp_path / "q.npz")
    from_file = {**cfg, "queries": {"source": "file", "path": str(tmp_path / "q.npz")}}
    count_scoring.clear()
    code, text = run_attribute(from_file, tmp_path / "b")
    assert code == 0, text
    assert count_scoring == []  # nothing scored
    for label in ("grad-dot", "dense-influence"):
        a, b = (np.load(tmp_path / d / label / "scores.npy") for d in ("a", "b"))
        assert a.tobytes() == b.tobytes()
        manifest = json.loads((tmp_path / "b" / label / "manifest.json").read_text())
        assert manifest["restored_from"].startswith(str(cache))
        assert manifest["identity"]["queries"]["path"] == str(tmp_path / "q.npz")
    shutil.rmtree(cache)  # b's outputs now stand on their own identity
    code, text = run_attribute(from_file, tmp_path / "b")
    assert code == 0 and count_scoring == [], text
    assert len(_entries(cache)) == 2  # outputs found finished in place are copied into the cache


def test_other_queries_miss_and_a_damaged_entry_is_rescored(
    tmp_path: Path, count_scoring: list[str]
) -> None:
    cache = tmp_path / "cache"
    cfg = {**LIN, "methods": ["grad-dot"], "score_cache": str(cache)}
    assert run_attribute(cfg, tmp_path / "a")[0] == 0
    other = {**cfg, "queries": {**LIN["queries"], "seed": 1}}
    assert run_attribute(other, tmp_path / "b")[0] == 0
    assert count_scoring == ["grad-dot", "grad-dot"] and len(_entries(cache)) == 2
    scores = _entries(cache)[0] / "scores.npy"
    scores.write_bytes(scores.read_bytes()[:-8])  # truncated after it was cached
    for out, rescored in (("c", 1), ("d", 0)):  # new directories: only the cache spares scoring
        count_scoring.clear()
        assert run_attribute(cfg, tmp_path / out)[0] == 0
        assert run_attribute(other, tmp_path / f"{out}-other")[0] == 0
        assert len(count_scoring) == rescored  # the damaged entry once, then it is repaired
    for e in _entries(cache):
        record = json.loads((e / "manifest.json").read_text())["files"]["scores.npy"]
        assert (e / "scores.npy").stat().st_size == record["size"]


def test_two_benches_on_one_suite_score_each_method_once(
    lin_suite: Path, tmp_path: Path, count_scoring: list[str]
) -> None:
    cfg = write_config(
        tmp_path / "b.yaml",
        {**LIN, "score_cache": str(tmp_path / "cache"), "evaluation": {"suite": str(lin_suite)}},
    )
    for out in ("x", "y"):
        code, text = run_cli("bench", str(cfg), "--out", str(tmp_path / out), "--quiet")
        assert code == 0, text
    assert sorted(count_scoring) == ["dense-influence", "grad-dot"]  # the first bench only
    x, y = (pd.read_csv(tmp_path / o / "lds.csv") for o in ("x", "y"))
    pd.testing.assert_frame_equal(x.drop(columns="seconds"), y.drop(columns="seconds"))


def test_off_by_default(tmp_path: Path) -> None:
    assert run_attribute({**LIN, "methods": ["grad-dot"]}, tmp_path / "a")[0] == 0
    assert {p.name for p in tmp_path.iterdir()} <= {"a", "a.yaml", "hash-cache.json"}
    manifest = json.loads((tmp_path / "a" / "grad-dot" / "manifest.json").read_text())
    assert "restored_from" not in manifest
