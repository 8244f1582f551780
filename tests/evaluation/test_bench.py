"""bench output files, self-contained HTML, topk, report rebuild, method-granularity resume."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd

from attribution_core.testing import run_cli


def test_bench_writes_every_file(lin_bench) -> None:
    for label in ("grad-dot", "dense-influence"):
        assert np.load(lin_bench / label / "scores.npy").shape == (40, 5)
        assert np.load(lin_bench / label / "predictions.npy").shape == (12, 5)
        assert (lin_bench / label / "manifest.json").is_file()
    for name in (
        "lds.csv",
        "pairwise.csv",
        "report.md",
        "report.html",
        "bench.json",
        "figures/lds.png",
        "figures/scatter.png",
    ):
        assert (lin_bench / name).is_file(), name
    pairs = pd.read_csv(lin_bench / "pairwise.csv")
    assert set(pairs.columns) >= {"a", "b", "diff", "ci_low", "ci_high", "resolved"}
    md = (lin_bench / "report.md").read_text()
    assert "(null: random scores)" in md and "(ceiling: split-seed reliability)" in md
    assert "Suite reliability" in md and "Pairwise differences" in md


def test_report_html_is_self_contained(lin_bench) -> None:
    html = (lin_bench / "report.html").read_text()
    srcs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]+)""", html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert len(srcs) == len(list((lin_bench / "figures").glob("*.png")))


def test_bench_resumes_at_method_granularity(lin_bench, lin_suite) -> None:
    from attribution_core.evaluation.bench import bench

    suite, cfg = lin_suite
    before = {
        p: (lin_bench / p / "scores.npy").stat().st_mtime_ns
        for p in ("grad-dot", "dense-influence")
    }
    data = {
        **cfg,
        "evaluation": {"suite": str(suite)},
        "methods": ["grad-dot", "dense-influence", "grad-cosine"],
    }
    table = bench(data, lin_bench, n_boot=200)
    after = {p: (lin_bench / p / "scores.npy").stat().st_mtime_ns for p in before}
    assert after == before  # finished methods were not recomputed
    assert list(table["label"]) == ["grad-dot", "dense-influence", "grad-cosine"]


def test_topk_json_matches_scores(lin_bench) -> None:
    code, output = run_cli("topk", str(lin_bench), "--query", "2", "--k", "3", "--format", "json")
    assert code == 0, output
    out = json.loads(output)
    s = np.load(lin_bench / "grad-dot" / "scores.npy")[:, 2]
    pos = [e["index"] for e in out["methods"]["grad-dot"]["positive"]]
    neg = [e["index"] for e in out["methods"]["grad-dot"]["negative"]]
    assert pos == list(np.argsort(-s, kind="stable")[:3])
    assert [s[i] for i in neg] == sorted(s)[:3]
    code, output = run_cli("topk", str(lin_bench), "--query", "2", "--k", "3")
    assert code == 0 and "grad-dot (query 2)" in output


def test_report_command_rebuilds(lin_bench) -> None:
    (lin_bench / "report.md").unlink()
    code, output = run_cli("report", str(lin_bench))
    assert code == 0 and (lin_bench / "report.md").is_file(), output
