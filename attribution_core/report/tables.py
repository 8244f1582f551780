"""Report tables (pandas): LDS with reference rows, reliability, pairwise, counterfactual."""

from __future__ import annotations

import html
import math
from typing import Any

import pandas as pd

from attribution_core.evaluation.lds import LDS_COLUMNS

RELIABILITY_FLAG = 0.3


def fmt(v: Any, digits: int = 3) -> str:
    """Numbers to fixed digits, NaN/None to '–'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        return (
            f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
        )
    return str(v)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(fmt(row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def to_html(df: pd.DataFrame) -> str:
    """An HTML table (escaped) with formatted numbers."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(row[c]))}</td>" for c in df.columns) + "</tr>"
        for _, row in df.iterrows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def reliability_table(reliability: dict[str, dict[str, float]]) -> pd.DataFrame:
    """One row per suite target: split-seed r, Spearman–Brown reliability, ceiling, variances."""
    rows = []
    for tid, r in reliability.items():
        rel = r.get("reliability")
        if "split_draw_r" in r:  # single-model suite: Monte-Carlo noise of the draws only
            rows.append(
                {
                    "target": tid,
                    "split_draw_r": r.get("split_draw_r"),
                    "reliability (2S draws)": rel,
                    "ceiling √rel": r.get("ceiling"),
                    "too noisy (< 0.3)": bool(
                        rel is not None and not math.isnan(rel) and rel < RELIABILITY_FLAG
                    ),
                }
            )
            continue
        rows.append(
            {
                "target": tid,
                "split_seed_r": r.get("split_seed_r"),
                "reliability (S-seed mean)": rel,
                "ceiling √rel": r.get("ceiling"),
                "between/within variance": r.get("variance_ratio"),
                "subset share": r.get("subset_share"),
                "too noisy (< 0.3)": bool(
                    rel is not None and not math.isnan(rel) and rel < RELIABILITY_FLAG
                ),
            }
        )
    return pd.DataFrame(rows)


def lds_table(
    table: pd.DataFrame, null: dict[str, float], rel: dict[str, float] | None
) -> pd.DataFrame:
    """The LDS table plus reference rows: random-score null (mean; p95) and the ceiling."""
    cols = [c for c in LDS_COLUMNS if c != "target" and c in table.columns]
    cross = [c for c in cols if c.startswith("lds_cross")]
    if all(table[c].isna().all() for c in cross):  # not measured (distributional suites)
        cols = [c for c in cols if c not in cross]
    out = table[cols].copy()
    extra = [
        {
            "label": "(null: random scores)",
            "method": "reference",
            "lds_mean": null["mean"],
            "lds_ci_high": null["p95"],
            "n_queries": table["n_queries"].iloc[0],
        }
    ]
    if rel:
        kind = "split-draw" if "split_draw_r" in rel else "split-seed"
        extra.append(
            {
                "label": f"(ceiling: {kind} reliability)",
                "method": "reference",
                "lds_mean": rel.get("ceiling"),
                "n_queries": table["n_queries"].iloc[0],
            }
        )
    return pd.concat([out, pd.DataFrame(extra)], ignore_index=True)


def pairwise_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """Each unordered pair once (a listed before b): a − b, 95 % CI, resolved."""
    if pairs.empty:
        return pairs
    order = {label: i for i, label in enumerate(dict.fromkeys(pairs["a"]))}
    keep = pairs[[order[a] < order[b] for a, b in zip(pairs["a"], pairs["b"], strict=True)]]
    return keep.rename(columns={"diff": "a − b", "ci_low": "ci 2.5%", "ci_high": "ci 97.5%"})


def counterfactual_summary(cf: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean over queries of the target change after removing its top examples;
    with ``regenerate`` also the mean pixel distance of the regenerated query (``pixels_top``,
    ``pixels_random``, ``pixels_full``: ‖x_regen − x_query‖₂ after top / random removal and for
    the full-data models, the seed-noise baseline)."""
    g = cf.groupby(["label", "method"], sort=False)
    agg = {
        "queries": ("query", "nunique"),
        "removed": ("removed", "first"),
        "change_top": ("change_mean", "mean"),
        "change_random": ("random_mean", "mean"),
        "top_minus_random": ("top_minus_random", "mean"),
    }
    if "regen_top_mean" in cf.columns:
        for name in ("top", "random", "full"):
            agg[f"pixels_{name}"] = (f"regen_{name}_mean", "mean")
    return g.agg(**agg).reset_index()
