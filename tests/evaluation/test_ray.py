"""Ray executor smoke test on a local Ray instance: same truth as the local executor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attribution_core.evaluation.suite import build_suite

ray = pytest.importorskip("ray")


def test_ray_suite_matches_local(lin_suite, tmp_path) -> None:
    _, cfg = lin_suite
    data = json.loads(json.dumps(cfg))
    # digits-classifier: Adam training, where thread counts could matter; 1 thread per job
    data["task"] = {"name": "digits-classifier", "n_train": 60, "hidden": 8, "steps": 60}
    data["target"] = "cross-entropy"
    data["dtype"] = "float32"
    data["evaluation"]["lds"].update(subsets=3, seeds=2, batch=2)
    local = build_suite(data, tmp_path / "local", command="pytest")
    data["executor"] = {"name": "ray", "num_cpus": 2}
    remote = build_suite(data, tmp_path / "ray", command="pytest")
    from attribution_core.builtin.executors import RayExecutor

    # any picklable callable (builtins too), results keyed by input index; shut down after
    got = dict(RayExecutor(num_cpus=2, shutdown=True).map(abs, [-3, 4, -5]))
    assert got == {0: 3, 1: 4, 2: 5} and not ray.is_initialized()
    # same seeds, one torch thread in both processes: float32 results agree to rounding
    np.testing.assert_allclose(
        remote.truth("cross-entropy"), local.truth("cross-entropy"), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        remote.oracle("cross-entropy"), local.oracle("cross-entropy"), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        remote.full("cross-entropy"), local.full("cross-entropy"), rtol=1e-6, atol=1e-7
    )
