"""The ``attribution`` command.

Exit codes: 0 success; 2 bad input (the message names the key/value, the valid choices and the
fix; no traceback); 1 internal failure (traceback).
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from attribution_core.dry_run import plan_attribute, plan_bench, plan_suite
from attribution_core.errors import AttributionError, DataError
from attribution_core.evaluation.bench import bench as run_bench
from attribution_core.evaluation.counterfactual import counterfactual as run_counterfactual
from attribution_core.evaluation.metasmoothness import DEFAULT_FD_STEPS, DEFAULT_H
from attribution_core.evaluation.metasmoothness import metasmoothness as run_metasmoothness
from attribution_core.evaluation.single import split_draw_line
from attribution_core.evaluation.suite import build_suite
from attribution_core.integrity import record_suite_hashes, verify_suite_full
from attribution_core.locking import directory_lock
from attribution_core.pipeline import attribute as run_attribute
from attribution_core.plan import RunPlan
from attribution_core.registry import get_registry
from attribution_core.report.render import write_report
from attribution_core.report.topk import format_topk
from attribution_core.report.topk import topk as run_topk
from attribution_core.storage import DiskFullError, disk_full, full_disk_message

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Training-data attribution: every method a plugin, one harness.",
)


class ExitCode(IntEnum):
    """Process exit codes."""

    OK = 0
    INTERNAL_ERROR = 1
    USAGE_ERROR = 2


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: KEY.PATH=VALUE (repeatable)."),
]


QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
DryRunOption = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print the resolved plan (methods, phases, peak memory and time estimates) and "
        "exit; nothing is trained or written.",
    ),
]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(ExitCode.USAGE_ERROR)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map user errors to exit 2 with one line; anything else to exit 1 with a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except AttributionError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            if not disk_full(exc):
                raise _internal() from None
            message = str(exc) if isinstance(exc, DiskFullError) else full_disk_message(exc)
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(ExitCode.INTERNAL_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; finished results are kept, re-run to resume", err=True)
            raise typer.Exit(130) from None
        except Exception:
            raise _internal() from None

    return wrapper


def _internal() -> typer.Exit:
    traceback.print_exc()
    typer.echo("internal error (exit 1): please report this with the traceback", err=True)
    return typer.Exit(ExitCode.INTERNAL_ERROR)


def _print_plan(plan: RunPlan) -> None:
    typer.echo(plan.format())
    plan.check()


@app.command("list")
@guarded
def list_components(
    format: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    kind: Annotated[str | None, typer.Option("--kind", help="only this kind")] = None,
) -> None:
    """List every registered component: kind, name, plugin, one-line help."""

    if format not in ("table", "json"):
        _fail(f"--format {format!r}: valid formats: table, json")
    reg = get_registry()
    rows = [
        {
            "kind": c.kind,
            "name": c.name,
            "plugin": c.plugin,
            "help": c.help,
            "options": sorted(c.options.model_fields) if c.options else [],
            **(
                {"composition": c.factory.composition(reg)}
                if hasattr(c.factory, "composition")
                else {}
            ),
        }
        for c in reg.components(kind)
    ]
    if format == "json":
        typer.echo(json.dumps(rows, indent=2))
        return

    composed = any("composition" in r for r in rows)
    table = Table("kind", "name", "plugin", "help", *(["composition"] if composed else []))
    for r in rows:
        extra = [r.get("composition", "")] if composed else []
        table.add_row(r["kind"], r["name"], r["plugin"], r["help"], *extra)
    Console().print(table)


@app.command()
@guarded
def attribute(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    set_: SetOption = None,
    quiet: QuietOption = False,
    dry_run: DryRunOption = False,
    topk: Annotated[
        int | None,
        typer.Option(
            "--topk",
            help="Write per query only the K most positive and negative training examples "
            "(OUT/<label>/topk.npz) instead of scores.npy (config key `topk`).",
        ),
    ] = None,
) -> None:
    """Attribute every method of CONFIG: OUT/<label>/scores.npy and manifest.json."""

    sets = (*(set_ or ()), *((f"topk={topk}",) if topk is not None else ()))
    if dry_run:
        return _print_plan(plan_attribute(config, sets))
    result = run_attribute(config, out=out, overrides=sets, progress=not quiet)
    for label, manifest in result.manifests.items():
        t = manifest["timings"].get("total", 0.0)
        typer.echo(f"{label}: scores {tuple(manifest['shape'])} -> {out / label} ({t:.1f} s)")


suite_app = typer.Typer(no_args_is_help=True, help="Pinned LDS suites (ground truth).")
app.add_typer(suite_app, name="suite")


@suite_app.command("build")
@guarded
def suite_build(
    config: Annotated[Path, typer.Argument(help="Run config (YAML) with evaluation.lds.")],
    out: Annotated[Path, typer.Option("--out", help="Suite directory (resumes if it exists).")],
    set_: SetOption = None,
    quiet: QuietOption = False,
    dry_run: DryRunOption = False,
) -> None:
    """Train base model, queries, masks, retrainings and oracle; measure targets (resumable)."""

    if dry_run:
        return _print_plan(plan_suite(config, tuple(set_ or ())))
    suite = build_suite(config, out, overrides=tuple(set_ or ()), progress=not quiet)
    for tid, r in suite.meta["reliability"].items():
        if "split_draw_r" in r:  # single-model suite: the ceiling is the split-draw reliability
            typer.echo(split_draw_line(tid, r))
            continue
        typer.echo(
            f"{tid}: split-seed r {r['split_seed_r']:.3f}, reliability {r['reliability']:.3f}, "
            f"between/within variance {r['variance_ratio']:.3g}"
            + ("  [too noisy to rank methods]" if r["reliability"] < 0.3 else "")
        )
    typer.echo(f"suite -> {out}")


@suite_app.command("verify")
@guarded
def suite_verify(
    suite: Annotated[Path, typer.Argument(help="Suite directory.")],
    write: Annotated[
        bool,
        typer.Option(
            "--write",
            help="Record the sizes and sha256 of the suite's files as they are now in suite.json "
            "(migrates a suite built before integrity checks; check the files first).",
        ),
    ] = False,
) -> None:
    """Re-hash every file of SUITE against suite.json (exit 2 naming each bad file)."""

    if not suite.is_dir():
        raise DataError(f"{str(suite)!r} is not a suite directory; give the path of a built suite")
    with directory_lock(suite, exclusive=write, what="suite"):
        n = record_suite_hashes(suite) if write else verify_suite_full(suite)
    typer.echo(f"suite {str(suite)!r}: {n} files {'recorded' if write else 'verified'}")


@app.command()
@guarded
def bench(
    config: Annotated[Path, typer.Argument(help="Run config (YAML) with evaluation.suite.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    set_: SetOption = None,
    quiet: QuietOption = False,
    dry_run: DryRunOption = False,
) -> None:
    """Every method on a pinned suite (no training): lds.csv, report.md, report.html, figures."""

    if dry_run:
        return _print_plan(plan_bench(config, tuple(set_ or ())))
    table = run_bench(config, out, overrides=tuple(set_ or ()), progress=not quiet)
    typer.echo(table.to_string(index=False))
    typer.echo(f"report -> {out / 'report.html'}")


@app.command()
@guarded
def counterfactual(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    out: Annotated[
        Path, typer.Option("--out", help="Output directory (a bench output is reused).")
    ],
    set_: SetOption = None,
    quiet: QuietOption = False,
) -> None:
    """Retrain without each method's top influences vs random removal (resumable)."""

    table = run_counterfactual(config, out, overrides=tuple(set_ or ()), progress=not quiet)
    typer.echo(table.to_string(index=False))


@app.command()
@guarded
def topk(
    directory: Annotated[Path, typer.Argument(help="A bench/attribute output directory.")],
    query: Annotated[int, typer.Option("--query", help="Query index.")],
    k: Annotated[int, typer.Option("--k", help="Examples per sign.")] = 8,
    format: Annotated[str, typer.Option("--format", help="table or json")] = "table",
) -> None:
    """Top positive and negative training examples of a query, per method."""

    if format not in ("table", "json"):
        _fail(f"--format {format!r}: valid formats: table, json")
    typer.echo(format_topk(run_topk(directory, query, k), query, format))


@app.command()
@guarded
def report(
    directory: Annotated[Path, typer.Argument(help="A bench output directory.")],
) -> None:
    """Rebuild report.md, report.html and figures from stored results."""

    if not (directory / "bench.json").is_file():
        raise DataError(
            f"{str(directory)!r} has no bench.json; run `attribution bench CONFIG --out DIR` first"
        )
    md, html = write_report(directory)
    typer.echo(f"report -> {md}, {html}")


def _floats(values: list[str] | None, default: tuple[float, ...], flag: str) -> list[float]:
    """``--h 1e-1,1e-2`` or repeated ``--h 1e-1 --h 1e-2`` as floats (default when absent)."""
    if not values:
        return list(default)
    out = []
    for part in (p for v in values for p in v.split(",") if p.strip()):
        try:
            out.append(float(part))
        except ValueError:
            _fail(f"{flag} {part!r}: not a number; give e.g. {flag} 1e-1,1e-2")
    return out


@app.command()
@guarded
def metasmoothness(
    config: Annotated[Path, typer.Argument(help="Run config (YAML); dtype: float64 recommended.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Writes OUT/metasmoothness.json.")
    ] = None,
    h: Annotated[
        list[str] | None,
        typer.Option(
            "--h", help="Def. 2 step sizes (comma-separated or repeated; default 1e-1,1e-2,1e-3)."
        ),
    ] = None,
    pairs: Annotated[
        int, typer.Option("--pairs", help="(j, query) pairs of the finite-difference table.")
    ] = 2,
    fd_steps: Annotated[
        list[str] | None,
        typer.Option("--fd-steps", help="Finite-difference step sizes (default 1e-1 … 1e-5)."),
    ] = None,
    direction_seed: Annotated[
        int | None, typer.Option("--direction-seed", help="Seed of v (default: the run seed).")
    ] = None,
    set_: SetOption = None,
    quiet: QuietOption = False,
) -> None:
    """Is the task's training smooth in the data weights? Def. 2 score and finite differences."""

    report = run_metasmoothness(
        config,
        out,
        overrides=tuple(set_ or ()),
        hs=_floats(h, DEFAULT_H, "--h"),
        pairs=pairs,
        fd_steps=_floats(fd_steps, DEFAULT_FD_STEPS, "--fd-steps"),
        direction_seed=direction_seed,
        log=None if quiet else (lambda line: typer.echo(line, err=True)),
    )
    typer.echo(report.markdown())
    if out is not None:
        typer.echo(f"metasmoothness -> {out / 'metasmoothness.json'}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="attribution", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        # click reports its own usage errors with exit 2 already
        sys.exit(code)


if __name__ == "__main__":
    main()
