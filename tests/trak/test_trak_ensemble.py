"""Optional ensembles: ``trak-ensemble`` = mean of independent ``trak`` runs over models/seeds."""

from __future__ import annotations

import numpy as np
import pytest
from trak_helpers import lr_config

from attribution_core import attribute

DIGITS = {
    "name": "digits-classifier",
    "classes": [0, 1, 2],
    "n_train": 45,
    "hidden": 4,
    "steps": 30,
}


def digits_cfg(methods, model_seed=0):
    return {
        "task": DIGITS,
        "queries": {"source": "generated", "count": 3},
        "target": "cross-entropy",
        "dtype": "float64",
        "model": {"seed": model_seed},
        "methods": methods,
    }


def test_one_member_is_trak_bitwise():
    res = attribute(
        lr_config(
            [
                {"name": "trak", "proj_dim": 16},
                {"name": "trak-ensemble", "ensemble": {"models": 1}, "proj_dim": 16},
            ]
        )
    )
    assert np.array_equal(res.scores["trak"], res.scores["trak-ensemble"])


def test_two_members_average_two_independent_trak_runs():
    """Member 1 = the model trained from seed 1 with projection/noise seed 1 (float64, so the
    mean of the two runs agrees to rounding: 1e-12 relative)."""
    ens = attribute(
        digits_cfg([{"name": "trak-ensemble", "ensemble": {"models": 2}, "proj_dim": 32}])
    )
    r0 = attribute(digits_cfg([{"name": "trak", "proj_dim": 32, "seed": 0}], model_seed=0))
    r1 = attribute(digits_cfg([{"name": "trak", "proj_dim": 32, "seed": 1}], model_seed=1))
    ref = (r0.scores["trak"] + r1.scores["trak"]) / 2
    got = ens.scores["trak-ensemble"]
    assert np.abs(got - ref).max() <= 1e-12 * np.abs(ref).max()
    assert not np.allclose(r0.scores["trak"], r1.scores["trak"])
    info = ens.manifests["trak-ensemble"]["info"]["ensemble"]
    assert info["models"] == 2
    assert [m["seed"] for m in info["members"]] == [0, 1]
    assert "ensemble_training" in ens.manifests["trak-ensemble"]["timings"]


def test_ensemble_default_is_off_for_trak():
    res = attribute(lr_config([{"name": "trak", "proj_dim": 8}]))
    assert "ensemble" not in res.manifests["trak"]["info"]


def test_models_must_be_positive():
    from attribution_core import ConfigError

    with pytest.raises(
        ConfigError, match=r"methods\[0\]\.ensemble\.models: .*greater than or equal to 1"
    ):
        attribute(lr_config([{"name": "trak-ensemble", "ensemble": {"models": 0}}]))
