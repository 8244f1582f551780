"""Shards (issue 20): row ranges defined by the data, fixed-order sums, resume, column blocks.

Exactness: sharding never changes a row's value (per-example noise), so sharded scores equal the
unsharded ones up to float32 matmul round-off (rtol 1e-5: the query-block and shard products
are the same dot products grouped differently by BLAS); reductions are summed in shard order, so
an executor that finishes shards in another order gives the same bits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attribution_core import LocalExecutor, ShardRunner, attribute, shard_ranges, tree_add
from attribution_core.shards import ShardStore
from attribution_core.sinks import MemmapSink, TopKSink
from attribution_core.testing import allclose_report

TASK = {"name": "digits-classifier", "n_train": 90, "hidden": 4, "steps": 10}


@given(st.integers(0, 500), st.integers(1, 12), st.integers(1, 40))
def test_shard_ranges_cover_the_rows_once_on_aligned_boundaries(n, count, align):
    ranges = shard_ranges(n, count, align)
    rows = [i for r in ranges for i in range(r.start, r.stop)]
    assert rows == list(range(n))
    assert len(ranges) <= count
    assert all(r.stop > r.start for r in ranges)
    assert all(r.start % align == 0 for r in ranges)
    if n >= count * align:
        assert len(ranges) == count


class ReversedExecutor(LocalExecutor):
    """Finishes jobs in reverse order (as a Ray run may)."""

    def map(self, fn, items, *, desc="", progress=False):
        yield from reversed(list(super().map(fn, items)))


def test_reduce_sums_in_shard_order_whatever_order_jobs_finish():
    torch.manual_seed(0)
    data = torch.randn(1000, dtype=torch.float32) * 1e4

    def job(rows):
        return {"s": data[rows].sum(), "n": [rows.stop - rows.start]}

    a = ShardRunner(LocalExecutor(), count=7, align=10).reduce("sum", job, 1000)
    b = ShardRunner(ReversedExecutor(), count=7, align=10).reduce("sum", job, 1000)
    assert torch.equal(a["s"], b["s"]) and a["n"] == b["n"] == [1000]
    expected = torch.zeros((), dtype=torch.float32)
    for r in shard_ranges(1000, 7, 10):  # the left fold, recomputed here
        expected = expected + data[r].sum()
    assert torch.equal(a["s"], expected)


def test_tree_add_refuses_different_structures():
    with pytest.raises(ValueError, match="differ in keys"):
        tree_add({"a": 1}, {"b": 1})


def test_store_reuses_finished_shards_and_forgets_other_identities(tmp_path):
    calls = []

    def job(rows):
        calls.append(rows.start)
        return torch.tensor(float(rows.stop - rows.start))

    runner = ShardRunner(LocalExecutor(), 4, 8, store=ShardStore(tmp_path, {"id": 1}))
    assert float(runner.reduce("p", job, 64)) == 64.0
    assert runner.counts["p"]["computed"] == 4 and len(calls) == 4
    again = ShardRunner(LocalExecutor(), 4, 8, store=ShardStore(tmp_path, {"id": 1}))
    assert float(again.reduce("p", job, 64)) == 64.0
    assert again.counts["p"] == {
        "shards": 4, "computed": 0, "reused": 4, "remote_tasks": 0, "executor": "local"
    }  # fmt: skip
    other = ShardRunner(LocalExecutor(), 4, 8, store=ShardStore(tmp_path, {"id": 2}))
    other.reduce("p", job, 64)
    assert other.counts["p"]["computed"] == 4  # another identity: nothing reused


def test_sinks_accept_column_blocks(tmp_path):
    torch.manual_seed(1)
    S = torch.randn(50, 7)
    full = MemmapSink(tmp_path / "a.npy", 50, 7)
    blocks = MemmapSink(tmp_path / "b.npy", 50, 7)
    top_full, top_blocks = TopKSink(None, 50, 7, 3), TopKSink(None, 50, 7, 3)
    full.write(slice(0, 50), S)
    top_full.write(slice(0, 50), S)
    for cols in (slice(0, 3), slice(3, 7)):
        for rows in (slice(0, 20), slice(20, 50)):
            blocks.write(rows, S[rows, cols], cols)
            top_blocks.write(rows, S[rows, cols], cols)
    assert np.array_equal(full.commit(), blocks.commit())
    for name in ("positive_index", "positive_score", "negative_index", "negative_score"):
        assert np.array_equal(
            getattr(top_full.commit(), name), getattr(top_blocks.commit(), name)
        ), name
    partial = MemmapSink(tmp_path / "c.npy", 50, 7)
    partial.write(slice(0, 50), S[:, :3], slice(0, 3))
    with pytest.raises(RuntimeError, match="50 of 50 training rows never written"):
        partial.commit()


def _config(**extra):
    return {
        "task": TASK,
        "methods": ["trak", "grad-dot", "grad-cosine", "kfac-influence"],
        "target": "cross-entropy",
        "queries": {"count": 5},
        "chunk_size": 8,
        **extra,
    }


@pytest.mark.parametrize("budget", [256 * 2**20, 1])
def test_sharded_and_blocked_scores_equal_the_single_pass(tmp_path, monkeypatch, budget):
    """Query blocks of 2 (5 queries): with the default budget the prepared blocks share one
    training pass; with a 1-byte budget each block is its own pass over its columns."""
    import attribution_core.score_pass as score_pass

    one = attribute(_config(), out=tmp_path / "one")
    monkeypatch.setattr(score_pass, "PREPARED_BYTES", budget)
    many = attribute(_config(shards=4, query_block=2), out=tmp_path / "many")
    passes = ["scores"] if budget > 1 else [f"scores-q{b}" for b in range(3)]
    for label, s in one.scores.items():
        report = allclose_report(np.asarray(many.scores[label]), np.asarray(s), rtol=1e-5,
                                 atol=1e-5 * float(np.abs(s).max()))  # fmt: skip
        assert not report, f"{label}: {report}"
        phases = many.manifests[label]["shards"]["phases"]
        assert set(passes) <= set(phases) and not {"scores-q0", "scores"} <= set(phases)
        assert all(p["shards"] >= 4 for p in phases.values()), (label, phases)
        assert many.manifests[label]["info"]["query_passes"] == len(passes)
        assert not (tmp_path / "many" / label / ".shards").exists()  # cleared once finished
    assert "fit" in many.manifests["trak"]["shards"]["phases"]
    saved = json.loads((tmp_path / "many" / "trak" / "manifest.json").read_text())
    assert saved["shards"]["count"] == 4
