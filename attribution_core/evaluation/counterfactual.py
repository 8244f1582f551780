"""Retraining without top influences (paper appendix D).

For the first ``queries`` queries and every method: remove the ``⌊remove_fraction · N⌋`` most
positively scored training examples, retrain ``seeds`` models (seeds ``TRUTH_SEED + k``, paired
with ``seeds`` full-data models trained here with the same seeds) and report the target's change
``m(θ_{D∖S}, k) − m(θ_D, k)`` (mean ± s.e. over seeds) next to an equal-size random removal
(one random set per query, shared by all methods).  A larger increase is better.

Training uses the same step count as full training: if the task has a ``scale_steps`` option
(fewer steps for less data), it is switched off for these retrainings.  Runs are stored one file
per model under ``DIR/counterfactual/runs`` (resumable like ``suite build``).

With ``regenerate: true`` (generated queries only) every retrained model — top removal, random
removal and full data — also regenerates the queries from the same sampling noise, and the
table gains the pixel distance ``‖x_regen − x_q‖₂`` (:mod:`attribution_core.evaluation.regenerate`;
mean ± s.e. over seeds) for each; the full-data distance is the seed-noise baseline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attribution_core.builtin.executors import make_executor
from attribution_core.config import (
    CounterfactualConfig,
    LDSConfig,
    RunConfig,
    as_measurement,
    load_config,
)
from attribution_core.errors import ConfigError
from attribution_core.evaluation import regenerate as R
from attribution_core.evaluation.bench import prepare
from attribution_core.evaluation.counterfactual_plan import (
    CF_COLUMNS,
    REGEN_COLUMNS,
    SINGLE_COLUMNS,
    CounterfactualSetup,
    RemovalPlan,
    plan_removals,
    predicted_changes,
    table_rows,
)
from attribution_core.evaluation.runs import (
    Job,
    Run,
    RunStore,
    execute,
    save_query_batch,
    target_id,
)
from attribution_core.evaluation.single import SINGLE
from attribution_core.interfaces import index_batch
from attribution_core.locking import command_locks
from attribution_core.outputs import require_full_scores
from attribution_core.pipeline import attribute, build_task, resolve
from attribution_core.report.render import write_report
from attribution_core.single_model import require_training_steps
from attribution_core.storage import atomic_save_npy, atomic_to_csv, atomic_write_json


def _same_steps(cfg: RunConfig, registry: Any) -> tuple[RunConfig, bool]:
    """``cfg`` with the task options under which a retraining on a subset takes as many steps
    as training on all of D (the task's ``full_step_options`` hook), and whether they changed.

    Only the options the hook changed are written into the config, so the run digests of a
    task without such options (or with them already set) stay what they were.
    """
    name = cfg.task.name
    options = registry.validate_options("task", name, cfg.task.options, where="task")
    factory = registry.get("task", name).factory
    full_step_options = getattr(factory, "full_step_options", dict)
    changed = {k: v for k, v in full_step_options(options).items() if options.get(k) != v}
    if not changed:
        return cfg, False
    data = cfg.model_dump(exclude_none=True)
    data["task"].update(changed)
    return load_config(data), True


def _protocol(cfg: RunConfig, suite: Any) -> tuple[str, float]:
    """``(protocol, removed weight)`` of the retrainings: the suite's when one is given, else the
    config's ``evaluation.lds``; distributional retrainings always remove (weight 0)."""
    if suite is not None:
        protocol, r = suite.protocol, float(suite.meta["lds"].get("removed_weight", 0.0))
    else:
        lds = cfg.evaluation.lds or LDSConfig()
        protocol, r = lds.protocol, lds.removed_weight
    return protocol, (r if protocol == SINGLE else 0.0)


def _file_id(run: Run, context: list[Any]) -> str:
    """``<name>-<digest>``: the run's name plus a digest of what defines its result."""
    key = json.dumps([context, list(run.removed), run.seed], sort_keys=True, default=str)
    return f"{run.run_id}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class _Retrained:
    """The finished runs of a :class:`RemovalPlan`.

    Attributes:
        store: the run files under ``counterfactual/runs``.
        file_of: run name -> stored run id (``<name>-<digest>``, :func:`_file_id`).
        results: run name -> stored result ``(rows, 2, nq)``: row 0 the target, row 1 the pixel
            distance (``regenerate`` only); value and Monte-Carlo s.e.; per query.
    """

    store: RunStore
    file_of: dict[str, str]
    results: dict[str, np.ndarray]


def _generation(cfg: RunConfig, suite: Any) -> tuple[int, int]:
    """``(count, seed)`` of the queries' generation: the suite's when one is given, else the
    config's (a ConfigError if the queries were not generated)."""
    if suite is not None:
        return R.generation_of(suite.meta["config"]["queries"], f"suite {str(suite.path)!r}")
    return R.generation_of(cfg.queries.model_dump(), "the config")


def _settle(cfg: RunConfig, out: Path) -> CounterfactualSetup:
    """Resolve the methods and check every precondition, before any work.

    Raises:
        ConfigError: only oracle methods, ``regenerate`` with queries that were not generated,
            or the single-model protocol with a task that has no training-step hook.
    """
    cf = cfg.evaluation.counterfactual or CounterfactualConfig()
    suite, task = None, None
    if cfg.evaluation.suite:
        suite, _, resolved, task = prepare(cfg, out)
    else:
        resolved = resolve(cfg)
    protocol, removed_weight = _protocol(cfg, suite)
    if protocol == SINGLE:  # the training-step hook, before any work
        task = task if task is not None else build_task(resolved)
        require_training_steps(task, "counterfactual with protocol: single-model")
    # (count, seed) of the queries' generation, before any work
    generation = _generation(cfg, suite) if cf.regenerate else None
    # oracle scorers (exact retraining) have no per-example ranking to remove from: skipped
    skipped = resolved.oracle_labels()
    if len(skipped) == len(resolved.methods):
        raise ConfigError(
            "methods: counterfactual needs a method with scores; "
            f"{', '.join(sorted(skipped))} only predict subsets from retrained models"
        )
    resolved = resolved.only([m.label for m in resolved.methods if m.label not in skipped])
    train_cfg, switched = _same_steps(resolved.config, resolved.registry)
    return CounterfactualSetup(
        cf=cf,
        resolved=resolved,
        task=task,
        protocol=protocol,
        removed_weight=removed_weight,
        generation=generation,
        skipped=skipped,
        train_cfg=train_cfg,
        switched=switched,
        target=as_measurement(cfg.target),
    )


def _file_ids(
    cfg: RunConfig, setup: CounterfactualSetup, dump: dict[str, Any], runs: list[Run]
) -> dict[str, str]:
    """Run name -> stored run id (:func:`_file_id`); ``dump`` is ``setup.train_cfg`` as JSON."""
    # a run's file name carries a digest of everything that defines it (removed set, seed,
    # training config, target, regeneration), so a re-run with other settings or rescored
    # methods trains new files instead of silently reusing stale ones
    defining = [
        dump["task"],
        dump["dtype"],
        dump["device"],
        cfg.seed,
        setup.target.model_dump(),
        setup.generation,
    ] + ([setup.protocol, setup.removed_weight] if setup.protocol == SINGLE else [])
    return {r.run_id: _file_id(r, defining) for r in runs}


def _retrain(
    cfg: RunConfig, setup: CounterfactualSetup, plan: RemovalPlan, out: Path, progress: bool
) -> _Retrained:
    """Train the planned runs whose files are missing, on the queries saved under
    ``counterfactual/queries``, and load all of them."""
    # regenerate: one more row per run file (pixel distances), so toggling it retrains
    store = RunStore(out / "counterfactual" / "runs", (1 + bool(setup.generation), 2, plan.nq))
    dump = setup.train_cfg.model_dump(mode="json")
    file_of = _file_ids(cfg, setup, dump, plan.runs)
    runs = [Run(file_of[r.run_id], r.removed, r.seed) for r in plan.runs]
    qpath = out / "counterfactual" / "queries"

    def make_job(group: tuple[Run, ...]) -> Job:
        return Job(
            dump,
            (setup.target.model_dump(),),
            str(qpath.resolve()),
            group,
            setup.removed_weight,
            cfg.seed,
            cfg.threads,
            setup.generation,
            protocol=setup.protocol,
        )

    executor = make_executor(cfg, setup.resolved.registry)
    batch = cfg.evaluation.lds.batch if cfg.evaluation.lds else 8
    stored = execute(
        runs, store, make_job, executor, batch, desc="counterfactual", progress=progress
    )
    return _Retrained(store, file_of, {name: stored[fid] for name, fid in file_of.items()})


def _regen_info(
    task: Any,
    queries: Any,
    plan: RemovalPlan,
    retrained: _Retrained,
    out: Path,
    generation: tuple[int, int],
) -> dict[str, Any]:
    """Save the grid images (``counterfactual/regenerated.npy``) and describe them for info.json."""
    labels = list(plan.top)
    grid = R.regenerated_images(task, retrained.store, queries, labels, plan.nq, retrained.file_of)
    if grid is not None:
        atomic_save_npy(out / "counterfactual" / "regenerated.npy", grid[0])
    return {
        "regenerate": True,
        "regenerate_generation": {"count": generation[0], "seed": generation[1]},
        "regenerated_columns": grid[1] if grid is not None else None,
    }


def _write_info(
    out: Path, setup: CounterfactualSetup, plan: RemovalPlan, regen: dict[str, Any]
) -> None:
    """``counterfactual/info.json``: the settings the table was computed under."""
    atomic_write_json(
        out / "counterfactual" / "info.json",
        {
            "remove_fraction": setup.cf.remove_fraction,
            "protocol": setup.protocol,
            "removed_weight": setup.removed_weight,
            "removed": plan.removed,
            "seeds": plan.seeds,
            "queries": plan.nq,
            "same_steps_as_full": True,
            "scale_steps_switched_off": setup.switched,
            "target": target_id(setup.target),
            "skipped_oracle_methods": sorted(setup.skipped),
            **regen,
        },
    )


def counterfactual(
    config: str | Path | dict[str, Any] | RunConfig,
    out: str | Path,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = False,
) -> pd.DataFrame:
    """Score every method (resuming ``bench``/``attribute`` output in ``out``), then retrain.

    Returns:
        The ``counterfactual.csv`` table (one row per method and query; with ``regenerate``
        also the :data:`REGEN_COLUMNS`).

    Raises:
        ConfigError: only oracle methods, or ``regenerate`` with queries that were not generated
            (checked before any work).
    """
    cfg = load_config(config, overrides)
    require_full_scores(cfg.topk, "counterfactual")
    out = Path(out)
    with command_locks(out, cfg.evaluation.suite):
        return _counterfactual(cfg, out, progress)


def _counterfactual(cfg: RunConfig, out: Path, progress: bool) -> pd.DataFrame:
    """:func:`counterfactual` under its locks: settle, score, retrain, then write the table,
    ``counterfactual/info.json`` and (next to ``bench`` output) the report."""
    setup = _settle(cfg, out)
    generation, single = setup.generation, setup.protocol == SINGLE
    result = attribute(setup.resolved, out=out, progress=progress, task=setup.task)
    plan = plan_removals(cfg, setup, result)
    queries = index_batch(result.queries, slice(0, plan.nq))
    base_distance = (
        R.check_base(result.task, result.model, queries, *generation) if generation else None
    )
    save_query_batch(out / "counterfactual" / "queries", queries)
    retrained = _retrain(cfg, setup, plan, out, progress)
    predicted = predicted_changes(result, setup, plan) if single else None
    rows = table_rows(setup, plan, retrained.results, predicted)
    extra = SINGLE_COLUMNS if single else []
    table = pd.DataFrame(rows, columns=CF_COLUMNS + (REGEN_COLUMNS if generation else []) + extra)
    atomic_to_csv(out / "counterfactual.csv", table)
    regen: dict[str, Any] = {"regenerate": False}
    if generation is not None and base_distance is not None:
        regen = _regen_info(result.task, queries, plan, retrained, out, generation)
        regen["regenerate_base_distance"] = base_distance.tolist()
    _write_info(out, setup, plan, regen)
    if (out / "bench.json").is_file():
        write_report(out)
    return table
