"""Seams the scale-out and hardening work builds on (issue 16, acceptance 4).

* scores go through a score sink chosen by the caller;
* a gradient stream restricted to a row range gives exactly those rows of the whole pass;
* a built method describes its plan without computing anything.
"""

from __future__ import annotations

import numpy as np
import torch

from attribution_core import (
    GradientStream,
    MemorySink,
    PlanSizes,
    ScoringContext,
    build_method,
    get_registry,
    resolve_method,
    select_parameters,
)

REG = get_registry()


def classifier_task():
    return REG.create("task", "digits-classifier", n_train=50, hidden=4, steps=10)


class RecordingSink(MemorySink):
    """A sink that also records which row ranges it was given."""

    def __init__(self, *args):
        super().__init__(*args)
        self.writes: list[tuple[int, int]] = []

    def write(self, rows, block):
        self.writes.append((rows.start, rows.stop))
        super().write(rows, block)


def test_scorers_write_their_rows_into_the_sink_they_are_given():
    task = classifier_task()
    model = task.base_model(0)
    queries = task.make_queries(model, 3, seed=1)
    sinks = []

    def sink(*args):
        sinks.append(RecordingSink(*args))
        return sinks[-1]

    for name in ("grad-dot", "grad-cosine", "kfac-influence"):
        sinks.clear()
        spec = resolve_method(name, REG, run_seed=0, where="methods[0]")
        scorer = build_method(spec, REG, task).scorer
        target = REG.create("measurement", "cross-entropy", task)
        plain = scorer.scores(task, model, queries, ScoringContext(target=target, chunk_size=16))
        spec = resolve_method(name, REG, run_seed=0, where="methods[0]")
        scorer = build_method(spec, REG, task).scorer
        ctx = ScoringContext(target=target, chunk_size=16, sink=sink)
        got = scorer.scores(task, model, queries, ctx)
        assert len(sinks) == 1 and got is sinks[0].result()
        assert sinks[0].writes == [(0, 16), (16, 32), (32, 48), (48, 50)]
        assert torch.equal(got, plain)


def test_a_restricted_gradient_stream_gives_exactly_those_rows():
    task = classifier_task()
    model = task.base_model(0)
    params, _ = select_parameters(model)
    stream = GradientStream(
        model, task.training_loss(), task.train_data(), params, seed=3, chunk_size=8
    )
    full = stream.stack()
    shard = stream.restrict(slice(13, 37))
    assert shard.n_rows == 24
    assert [rows for rows, _ in shard.chunks()] == [slice(13, 21), slice(21, 29), slice(29, 37)]
    assert torch.equal(shard.stack(), full[13:37])  # per-example noise: chunking never matters


def test_a_restricted_stream_reads_its_rows_from_a_finished_cache(tmp_path):
    from attribution_core import GradientCache

    task = classifier_task()
    model = task.base_model(0)
    params, _ = select_parameters(model)
    cache = GradientCache(tmp_path)
    stream = GradientStream(
        model, task.training_loss(), task.train_data(), params, seed=3, cache=cache
    )
    shard = stream.restrict(slice(5, 20))
    uncached = shard.stack()  # no whole-matrix entry yet: the shard writes its own rows' entry
    assert len(list((tmp_path / "gradients").glob("*.npy"))) == 1
    assert torch.equal(shard.stack(), uncached)  # read back from the shard's entry
    full = stream.stack()  # the whole pass writes the whole-matrix entry
    assert len(list((tmp_path / "gradients").glob("*.npy"))) == 2
    assert torch.equal(shard.stack(), full[5:20]) and torch.equal(uncached, full[5:20])
    other = stream.restrict(slice(10, 30))  # another range reads the whole-matrix entry
    assert torch.equal(other.stack(), full[10:30])
    assert len(list((tmp_path / "gradients").glob("*.npy"))) == 2


def test_a_built_method_plans_without_computing():
    """Sizes far beyond this machine: a plan computes nothing, so it returns at once."""
    task = classifier_task()
    spec = resolve_method({"name": "trak", "proj_dim": 64}, REG, run_seed=0, where="methods[0]")
    method = build_method(spec, REG, task)
    sizes = PlanSizes(n_train=20_000, n_query=1_000, n_params=1210, chunk_size=64)
    phases = method.plan(sizes)
    assert [p.name for p in phases] == ["fit", "query_gradients", "train_gradients_and_scores"]
    scores = phases[-1]
    assert scores.rows == 20_000 and scores.largest == (20_000, 1_000)
    assert scores.bytes == (20_000 * 1_000 + 64 * 1210) * 4
    ens = resolve_method(
        {"name": "grad-dot", "ensemble": {"models": 3}}, REG, run_seed=0, where="m"
    )
    phases = build_method(ens, REG, task).plan(sizes)
    assert phases[0].name == "ensemble_training" and phases[0].rows == 2 * 20_000
    assert np.all([p.rows % 3 == 0 for p in phases[1:]])
