"""Checks that a config fits a pinned suite, before any work (bench, dry runs, resumed builds).

Each raises a :class:`~attribution_core.errors.ConfigError` or
:class:`~attribution_core.errors.DataError` naming the setting and how to fix it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from attribution_core.config import RunConfig
from attribution_core.errors import ConfigError, DataError
from attribution_core.interfaces import Task
from attribution_core.training_step import DESCRIPTION_BASELINE

if TYPE_CHECKING:
    from attribution_core.evaluation.suite import Suite

LDS_KEYS = ("subsets", "seeds", "kept_fraction", "removed_weight")
"""The ``evaluation.lds`` settings a suite records (``suite.json``'s ``lds``)."""


def as_json(value: Any) -> Any:
    """``value`` as it reads back from ``suite.json`` (tuples → lists, other types → str)."""
    return json.loads(json.dumps(value, default=str))


def check_lds_block(cfg: RunConfig, suite: Suite) -> None:
    """An ``evaluation.lds`` block may only restate the suite's own settings."""
    lds = cfg.evaluation.lds
    if lds is None:
        return
    built = suite.meta["lds"]
    if "protocol" in lds.model_fields_set and lds.protocol != suite.protocol:
        raise ConfigError(
            f"evaluation.lds.protocol: {lds.protocol!r} conflicts with suite {str(suite.path)!r}, "
            f"built under the {suite.protocol!r} protocol; bench takes the protocol from the "
            f"suite — remove evaluation.lds.protocol or point evaluation.suite at a suite built "
            f"with protocol: {lds.protocol}"
        )
    recorded = {"cross_seeds": 0, "cross_seed_scope": "stream", **built}
    for k in sorted(lds.model_fields_set & {"cross_seeds", "cross_seed_scope"}):
        if getattr(lds, k) != recorded[k]:
            raise ConfigError(
                f"evaluation.lds.{k}: {getattr(lds, k)!r} conflicts with suite "
                f"{str(suite.path)!r} (built with {k}={recorded[k]!r}); remove it or build the "
                f"suite with this setting"
            )
    for k in sorted(lds.model_fields_set & set(LDS_KEYS)):
        if getattr(lds, k) != built[k]:
            raise ConfigError(
                f"evaluation.lds.{k}: {getattr(lds, k)!r} conflicts with suite {str(suite.path)!r} "
                f"(built with {k}={built[k]!r}); the suite's masks and seeds win — remove the "
                f"evaluation.lds block or build a new suite with these settings"
            )


def check_masks(suite: Suite, n_train: int) -> None:
    """The suite's masks must have one column per training example of the task."""
    if suite.masks.dtype != np.bool_:
        raise DataError(
            f"evaluation.suite: masks.npy of {str(suite.path)!r} has dtype {suite.masks.dtype}; "
            f"expected bool (True = kept) — rebuild the suite with `attribution suite build`"
        )
    if suite.masks.ndim != 2 or suite.masks.shape[1] != n_train:
        raise DataError(
            f"evaluation.suite: masks.npy of {str(suite.path)!r} has shape {suite.masks.shape}, "
            f"but the task has {n_train} training examples; use the task config the suite was "
            f"built with: {json.dumps(suite.meta['config']['task'])}"
        )


def check_task(meta: dict[str, Any], where: Path, task: Task) -> None:
    """The config's task must describe the training run the suite at ``where`` was built from
    (``suite.json``'s ``task``: the built task's ``describe()``), or bench and a resumed build
    would replay or extend another run than the suite's.

    Compared: every option the suite recorded, and the recipe options (absent = the core's
    :data:`DESCRIPTION_BASELINE`). Options newer than the suite (absent from its record) are not
    compared: options are added with a default that keeps the old behaviour.
    """
    recorded = meta.get("task")
    if recorded is None:
        return
    base = as_json(DESCRIPTION_BASELINE)
    config = {**base, **as_json(task.describe())}  # recipe keys spelled out on both sides
    suite = {**base, **recorded}
    keys = sorted(k for k in suite if suite[k] != config.get(k))
    if keys:
        shown = "; ".join(f"{k}: config {config.get(k)!r}, suite {suite[k]!r}" for k in keys)
        raise ConfigError(
            f"task: the config describes another training run than suite {str(where)!r} was "
            f"built from ({shown}); set them to the suite's: "
            + " ".join(f"--set task.{k}={suite[k]}" for k in keys)
        )
