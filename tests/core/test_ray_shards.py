"""Attribution sharded over Ray tasks equals the local executor (issue 20, acceptance 1).

Tolerance: none — bitwise. Each shard runs the same code on the same rows with the same thread
count (1) wherever it runs, and reductions are summed in shard order on the driver, so a local
instance of Ray with 2 workers must reproduce the local executor's bits for equal ``shards``.
Every phase must have run as at least 4 Ray tasks (one task per method is not sharding).
"""

from __future__ import annotations

import numpy as np
import pytest

from attribution_core import attribute
from attribution_core.builtin.executors import shutdown_ray

ray = pytest.importorskip("ray")

METHODS = ["kfac-influence", "ekfac-influence", "trak", "grad-dot"]
SHARDED_FITS = {"kfac-influence": {"kfac-factors"},
                "ekfac-influence": {"kfac-factors", "ekfac-correction"}, "trak": {"fit"}}  # fmt: skip


def _config(executor):
    return {
        "task": {"name": "ddpm-digits", "classes": [0, 1], "train_steps": 20, "width": 8},
        "methods": METHODS,
        "queries": {"count": 4},
        "chunk_size": 16,
        "shards": 4,
        "executor": executor,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-shards")
    local = attribute(_config({"name": "local"}), out=root / "local")
    try:
        remote = attribute(_config({"name": "ray", "num_cpus": 2}), out=root / "ray")
    finally:
        shutdown_ray()  # Ray and every process it started (watchdog included)
    return local, remote


@pytest.mark.parametrize("label", METHODS)
def test_ray_shards_equal_the_local_executor_bitwise(runs, label):
    local, remote = runs
    assert np.array_equal(np.asarray(remote.scores[label]), np.asarray(local.scores[label]))


@pytest.mark.parametrize("label", METHODS)
def test_every_phase_ran_as_at_least_four_ray_tasks(runs, label):
    _, remote = runs
    phases = remote.manifests[label]["shards"]["phases"]
    assert SHARDED_FITS.get(label, set()) | {"scores"} <= set(phases), phases
    for name, counts in phases.items():
        assert counts["executor"] == "ray", (name, counts)
        assert counts["remote_tasks"] >= 4 and counts["computed"] == counts["shards"], (
            name,
            counts,
        )
