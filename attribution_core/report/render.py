"""``report.md`` and a self-contained ``report.html`` (figures inline as base64 PNG)."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attribution_core.report import plots, tables
from attribution_core.storage import atomic_write_text

CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#eee}img{max-width:100%;border:1px solid #ddd}.note{color:#555;font-size:13px}
.warn{color:#a00}"""


def _figures(out: Path, meta: dict[str, Any], table: pd.DataFrame) -> list[tuple[str, Path]]:
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    rel = meta["reliability"].get(meta["target"], {})
    figs = [
        (
            "LDS per method",
            plots.lds_bars(table, meta["null"], rel.get("ceiling"), fig_dir / "lds.png"),
        )
    ]
    sweep = plots.damping_sweep(table, fig_dir / "damping_sweep.png")
    if sweep is not None:
        figs.append(("Damping sweep", sweep))
    truth_path = Path(meta["suite"]) / "truth" / f"{meta['target']}.npy"
    preds = {
        label: np.load(out / label / "predictions.npy")
        for label in table["label"]
        if (out / label / "predictions.npy").is_file()
    }
    if truth_path.is_file() and preds:
        figs.append(
            (
                "Predicted vs actual (first queries)",
                plots.scatter(
                    preds, np.load(truth_path), meta["per_query"], fig_dir / "scatter.png"
                ),
            )
        )
    if (out / "images" / "train.npy").is_file():
        train, queries = (
            np.load(out / "images" / "train.npy"),
            np.load(out / "images" / "queries.npy"),
        )
        for label in table["label"]:
            if not (out / label / "scores.npy").is_file():  # oracle rows have predictions only
                continue
            s = np.load(out / label / "scores.npy")
            figs.append(
                (
                    f"Top influences: {label}",
                    plots.image_grid(queries, train, s, label, fig_dir / f"grid_{label}.png"),
                )
            )
    info_path, regen_path = (
        out / "counterfactual" / "info.json",
        out / "counterfactual" / "regenerated.npy",
    )
    if (out / "counterfactual.csv").is_file() and info_path.is_file() and regen_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("regenerate") and info.get("regenerated_columns"):
            figs.append(
                (
                    "Counterfactual: queries regenerated from the same noise",
                    plots.regenerated_grid(
                        np.load(regen_path),
                        info["regenerated_columns"],
                        fig_dir / "counterfactual_regenerated.png",
                    ),
                )
            )
    return figs


PROTOCOLS = {
    "distributional": "each subset retrained from fresh seeds: what a model trained on D∖S "
    "does on average",
    "single-model": "each subset retrained with the base model's seed, initialisation and "
    "draw stream: what this model learned from each example",
}


def protocol_notes(meta: dict[str, Any], table: pd.DataFrame) -> list[str]:
    """Report notes of a single-model suite: the oracle, the ceiling, the cross-seed columns."""
    if meta.get("protocol") != "single-model":
        return []
    notes = [
        "Single-model protocol: the ceiling is the split-draw reliability (each model's target "
        "on 2S draws, Spearman between the two S-draw halves, Spearman–Brown-corrected to 2S)."
    ]
    if "exact-retraining" in set(table["method"]):
        notes.append(
            "exact-retraining scores 1.000 by construction: under the single-model protocol a "
            "retraining with the base seed is the truth itself (no oracle models are trained)."
        )
    cross = meta.get("cross") or {}
    if cross.get("seeds"):
        notes.append(
            f"lds_cross_seed: LDS against the truth retrained under {len(cross['seeds'])} other "
            f"seed(s) (scope {meta['lds'].get('cross_seed_scope', 'stream')}) on the first "
            f"{cross['masks']} masks; lds_cross_masks: the same-seed LDS on those masks."
        )
    return notes


@dataclass(frozen=True)
class _ReportParts:
    """Everything ``report.md`` and ``report.html`` show, as text (Markdown and HTML alike).

    Attributes:
        target: the benchmarked target's id (the page title).
        header: the protocol, suite and LDS settings in one paragraph.
        warn: the noisy-targets warning, or "" when every target is reliable enough.
        notes: one line per note (missing baselines, single-model protocol).
        sections: ``(title, Markdown table, HTML table)`` per table, in page order.
        figs: ``(title, PNG path)`` per figure under ``figures/``.
        suite_command: the command that built the suite.
    """

    target: str
    header: str
    warn: str
    notes: list[str]
    sections: list[tuple[str, str, str]]
    figs: list[tuple[str, Path]]
    suite_command: Any


def _header(meta: dict[str, Any], table: pd.DataFrame) -> str:
    """The paragraph under the title: protocol, suite size, α, N, target, queries, LDS and CI."""
    lds_cfg = meta["lds"]
    protocol = meta.get("protocol", "distributional")
    return (
        f"Protocol: {protocol} ({PROTOCOLS.get(protocol, '')}). "
        f"Suite `{meta['suite']}`: {lds_cfg['subsets']} subsets × {lds_cfg['seeds']} seeds, "
        f"α = {lds_cfg['kept_fraction']}, removed weight {lds_cfg['removed_weight']}, "
        f"N = {meta['n_train']}; target `{meta['target']}`; "
        f"{int(table['n_queries'].iloc[0])} queries. LDS = Spearman over subsets per query, "
        f"mean ± s.e. over queries; CI = 95 % bootstrap over subsets ({meta['n_boot']} resamples)."
    )


def _noise_warning(rel: dict[str, Any]) -> str:
    """The targets whose split-seed reliability is below the flag, or "" if there are none."""
    noisy = [
        t
        for t, r in rel.items()
        if r.get("reliability") is not None
        and not math.isnan(r["reliability"])
        and r["reliability"] < tables.RELIABILITY_FLAG
    ]
    return (
        (
            f"Targets too noisy to rank methods (split-seed reliability < {tables.RELIABILITY_FLAG}): "
            + ", ".join(f"`{t}`" for t in noisy)
        )
        if noisy
        else ""
    )


def _notes(meta: dict[str, Any], table: pd.DataFrame) -> list[str]:
    """Missing no-model baselines, then the single-model protocol's notes."""
    notes = []
    if "pixel-similarity" not in set(table["method"]) and "clip" not in set(table["method"]):
        notes.append(
            "No `pixel-similarity`/`clip` baseline in this run (not configured or not registered)."
        )
    if "clip" not in set(table["method"]) and "pixel-similarity" in set(table["method"]):
        notes.append(
            "CLIP not run (no weights given): `pixel-similarity` is the no-model baseline."
        )
    return notes + protocol_notes(meta, table)


def _sections(
    out: Path, meta: dict[str, Any], table: pd.DataFrame, pairs: pd.DataFrame
) -> list[tuple[str, str, str]]:
    """``(title, Markdown, HTML)`` of the reliability, LDS, pairwise and counterfactual tables
    (the last two only when there is something to show)."""
    rel = meta["reliability"]
    rel_df = tables.reliability_table(rel)
    lds_df = tables.lds_table(table, meta["null"], rel.get(meta["target"]))
    pair_df = tables.pairwise_table(pairs)
    cf_path = out / "counterfactual.csv"
    cf_df = tables.counterfactual_summary(pd.read_csv(cf_path)) if cf_path.is_file() else None
    sections: list[tuple[str, str, str]] = [
        ("Suite reliability (the ceiling)", tables.to_markdown(rel_df), tables.to_html(rel_df)),
        ("LDS", tables.to_markdown(lds_df), tables.to_html(lds_df)),
    ]
    if not pair_df.empty:
        sections.append(
            (
                "Pairwise differences (paired bootstrap over subsets)",
                tables.to_markdown(pair_df),
                tables.to_html(pair_df),
            )
        )
    if cf_df is not None:
        sections.append(
            (
                "Retraining without top influences (change of the target; larger = better"
                + (
                    "; pixels_*: ‖x_regen − x_query‖₂ of the query regenerated from the same "
                    "noise, pixels_full = seed-noise baseline)"
                    if "pixels_top" in cf_df.columns
                    else ")"
                ),
                tables.to_markdown(cf_df),
                tables.to_html(cf_df),
            )
        )
    return sections


def _markdown(parts: _ReportParts) -> str:
    """The text of ``report.md`` (figures linked from ``figures/``)."""
    md = [f"# Attribution benchmark: {parts.target}", "", parts.header, ""]
    md += [f"**{parts.warn}**", ""] if parts.warn else []
    md += [f"> {n}" for n in parts.notes] + ([""] if parts.notes else [])
    for title, body, _ in parts.sections:
        md += [f"## {title}", "", body, ""]
    md += ["## Figures", ""]
    md += [f"### {title}\n\n![{title}](figures/{path.name})\n" for title, path in parts.figs]
    md += [f"Suite built with: `{parts.suite_command}`", ""]
    return "\n".join(md)


def _html(parts: _ReportParts) -> str:
    """The text of ``report.html``: self-contained, figures inline as base64 PNG."""
    h = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Attribution benchmark</title>"
        f"<style>{CSS}</style></head><body><h1>Attribution benchmark: {html.escape(parts.target)}</h1>",
        f"<p class='note'>{html.escape(parts.header)}</p>",
    ]
    if parts.warn:
        h.append(f"<p class='warn'><b>{html.escape(parts.warn)}</b></p>")
    h += [f"<p class='note'>{html.escape(n)}</p>" for n in parts.notes]
    for title, _, body in parts.sections:
        h.append(f"<h2>{html.escape(title)}</h2>{body}")
    h.append("<h2>Figures</h2>")
    for title, path in parts.figs:
        data = base64.b64encode(path.read_bytes()).decode()
        h.append(
            f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    h.append(
        f"<p class='note'>Suite built with: <code>{html.escape(str(parts.suite_command))}</code></p>"
    )
    h.append("</body></html>")
    return "\n".join(h)


def write_report(out: str | Path) -> tuple[Path, Path]:
    """(Re)build ``report.md``, ``report.html`` and ``figures/*.png`` from a bench directory."""
    out = Path(out)
    meta = json.loads((out / "bench.json").read_text())
    table = pd.read_csv(out / "lds.csv")
    pairs = (
        pd.read_csv(out / "pairwise.csv")
        if (out / "pairwise.csv").stat().st_size > 1
        else pd.DataFrame()
    )
    figs = _figures(out, meta, table)
    sections = _sections(out, meta, table, pairs)
    parts = _ReportParts(
        target=meta["target"],
        header=_header(meta, table),
        warn=_noise_warning(meta["reliability"]),
        notes=_notes(meta, table),
        sections=sections,
        figs=figs,
        suite_command=meta.get("suite_command"),
    )
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, _markdown(parts))
    atomic_write_text(html_path, _html(parts))
    return md_path, html_path
