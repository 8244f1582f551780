"""``report.md`` and a self-contained ``report.html`` (figures inline as base64 PNG)."""

from __future__ import annotations

import base64
import html
import json
import math
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
    rel = meta["reliability"]
    rel_df = tables.reliability_table(rel)
    lds_df = tables.lds_table(table, meta["null"], rel.get(meta["target"]))
    pair_df = tables.pairwise_table(pairs)
    cf_path = out / "counterfactual.csv"
    cf_df = tables.counterfactual_summary(pd.read_csv(cf_path)) if cf_path.is_file() else None

    lds_cfg = meta["lds"]
    protocol = meta.get("protocol", "distributional")
    header = (
        f"Protocol: {protocol} ({PROTOCOLS.get(protocol, '')}). "
        f"Suite `{meta['suite']}`: {lds_cfg['subsets']} subsets × {lds_cfg['seeds']} seeds, "
        f"α = {lds_cfg['kept_fraction']}, removed weight {lds_cfg['removed_weight']}, "
        f"N = {meta['n_train']}; target `{meta['target']}`; "
        f"{int(table['n_queries'].iloc[0])} queries. LDS = Spearman over subsets per query, "
        f"mean ± s.e. over queries; CI = 95 % bootstrap over subsets ({meta['n_boot']} resamples)."
    )
    noisy = [
        t
        for t, r in rel.items()
        if r.get("reliability") is not None
        and not math.isnan(r["reliability"])
        and r["reliability"] < tables.RELIABILITY_FLAG
    ]
    warn = (
        (
            f"Targets too noisy to rank methods (split-seed reliability < {tables.RELIABILITY_FLAG}): "
            + ", ".join(f"`{t}`" for t in noisy)
        )
        if noisy
        else ""
    )
    notes = []
    if "pixel-similarity" not in set(table["method"]) and "clip" not in set(table["method"]):
        notes.append(
            "No `pixel-similarity`/`clip` baseline in this run (not configured or not registered)."
        )
    if "clip" not in set(table["method"]) and "pixel-similarity" in set(table["method"]):
        notes.append(
            "CLIP not run (no weights given): `pixel-similarity` is the no-model baseline."
        )
    notes += protocol_notes(meta, table)
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

    md = [f"# Attribution benchmark: {meta['target']}", "", header, ""]
    md += [f"**{warn}**", ""] if warn else []
    md += [f"> {n}" for n in notes] + ([""] if notes else [])
    for title, body, _ in sections:
        md += [f"## {title}", "", body, ""]
    md += ["## Figures", ""]
    md += [f"### {title}\n\n![{title}](figures/{path.name})\n" for title, path in figs]
    md += [f"Suite built with: `{meta.get('suite_command')}`", ""]
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, "\n".join(md))

    h = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Attribution benchmark</title>"
        f"<style>{CSS}</style></head><body><h1>Attribution benchmark: {html.escape(meta['target'])}</h1>",
        f"<p class='note'>{html.escape(header)}</p>",
    ]
    if warn:
        h.append(f"<p class='warn'><b>{html.escape(warn)}</b></p>")
    h += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    for title, _, body in sections:
        h.append(f"<h2>{html.escape(title)}</h2>{body}")
    h.append("<h2>Figures</h2>")
    for title, path in figs:
        data = base64.b64encode(path.read_bytes()).decode()
        h.append(
            f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    h.append(
        f"<p class='note'>Suite built with: <code>{html.escape(str(meta.get('suite_command')))}</code></p>"
    )
    h.append("</body></html>")
    atomic_write_text(html_path, "\n".join(h))
    return md_path, html_path
