"""Figures (matplotlib, Agg backend): LDS bars, damping sweep, predicted-vs-actual scatter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from attribution_core.storage import atomic_savefig


def lds_bars(
    table: pd.DataFrame, null: dict[str, float], ceiling: float | None, path: Path
) -> Path:
    """Bar per label: LDS mean with ± stderr error bars; null p95 and reliability ceiling lines."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(table) + 2), 3.6))
    x = np.arange(len(table))
    ax.bar(x, table["lds_mean"], yerr=table["lds_stderr"], capsize=4, color="#4c72b0")
    ax.axhline(
        null["p95"], color="grey", ls="--", lw=1, label=f"random scores p95 ({null['p95']:.3f})"
    )
    if ceiling is not None and np.isfinite(ceiling):
        ax.axhline(
            ceiling, color="#c44e52", ls=":", lw=1.5, label=f"reliability ceiling ({ceiling:.3f})"
        )
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(x, table["label"], rotation=30, ha="right")
    ax.set_ylabel("LDS (Spearman), mean ± s.e. over queries")
    ax.set_title(f"LDS on target {table['target'].iloc[0]}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    atomic_savefig(path, fig, dpi=110)
    plt.close(fig)
    return path


def damping_sweep(table: pd.DataFrame, path: Path) -> Path | None:
    """LDS vs damping (log x) for every method with ≥ 2 damping values; None if there is none."""
    sweep = table.dropna(subset=["damping"])
    sweep = sweep[sweep.groupby("method")["damping"].transform("nunique") >= 2]
    if sweep.empty:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method, g in sweep.groupby("method"):
        g = g.sort_values("damping")
        ax.errorbar(
            g["damping"], g["lds_mean"], yerr=g["lds_stderr"], marker="o", capsize=3, label=method
        )
    ax.set_xscale("log")
    ax.set_xlabel("damping λ (absolute)")
    ax.set_ylabel("LDS")
    ax.set_title("Damping sweep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(path, fig, dpi=110)
    plt.close(fig)
    return path


def scatter(
    predictions: dict[str, np.ndarray],
    truth: np.ndarray,
    per_query: dict[str, Any],
    path: Path,
    n_queries: int = 3,
) -> Path:
    """Grid (methods × first queries): predicted change vs actual (seed-mean) target."""
    labels = list(predictions)[:8]
    nq = min(n_queries, truth.shape[2])
    actual = truth.mean(axis=1)
    fig, axes = plt.subplots(len(labels), nq, figsize=(2.6 * nq, 2.2 * len(labels)), squeeze=False)
    for i, label in enumerate(labels):
        for q in range(nq):
            ax = axes[i][q]
            ax.scatter(predictions[label][:, q], actual[:, q], s=8, alpha=0.7)
            ax.set_title(f"{label} · q{q} · ρ={per_query[label][q]:.2f}", fontsize=7)
            ax.tick_params(labelsize=6)
            if q == 0:
                ax.set_ylabel("actual", fontsize=7)
            if i == len(labels) - 1:
                ax.set_xlabel("predicted change", fontsize=7)
    fig.tight_layout()
    atomic_savefig(path, fig, dpi=100)
    plt.close(fig)
    return path


def image_grid(
    query_images: np.ndarray,
    train_images: np.ndarray,
    scores: np.ndarray,
    title: str,
    path: Path,
    n_queries: int = 4,
    k: int = 8,
) -> Path:
    """Rows: a query, its top-``k`` positive and top-``k`` negative training images.

    Args:
        query_images: ``(Q, C, H, W)`` in [0, 1]; train_images: ``(N, C, H, W)``;
        scores: ``(N, Q)``.
    """
    nq = min(n_queries, query_images.shape[0])
    cols = 1 + 2 * k
    fig, axes = plt.subplots(nq, cols, figsize=(0.75 * cols, 0.95 * nq + 0.4), squeeze=False)

    def show(ax: Any, img: np.ndarray, label: str, color: str = "black") -> None:
        img = np.clip(img, 0, 1)
        ax.imshow(
            img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1
        )
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=5, color=color)

    for q in range(nq):
        order = np.argsort(-scores[:, q], kind="stable")
        show(axes[q][0], query_images[q], f"query {q}", "#c44e52")
        for j, idx in enumerate(order[:k]):
            show(axes[q][1 + j], train_images[idx], f"+{j + 1}: #{idx}", "#2a7f2a")
        for j, idx in enumerate(order[::-1][:k]):
            show(axes[q][1 + k + j], train_images[idx], f"−{j + 1}: #{idx}", "#3b4cc0")
    fig.suptitle(f"{title}: query | top-{k} positive | top-{k} negative", fontsize=8)
    fig.tight_layout()
    atomic_savefig(path, fig, dpi=110)
    plt.close(fig)
    return path


def regenerated_grid(images: np.ndarray, columns: list[str], path: Path) -> Path:
    """Rows: a query; columns: the original and its regenerations from the same noise.

    Args:
        images: ``(Q, len(columns), C, H, W)`` in [0, 1] (``counterfactual/regenerated.npy``).
        columns: column names (query, full data, one per method, random).
    """
    nq, cols = images.shape[:2]
    fig, axes = plt.subplots(nq, cols, figsize=(0.9 * cols + 0.4, 0.95 * nq + 0.5), squeeze=False)
    for q in range(nq):
        for c in range(cols):
            img, ax = np.clip(images[q, c], 0, 1), axes[q][c]
            ax.imshow(
                img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if q == 0:
                ax.set_title(columns[c], fontsize=6)
        axes[q][0].set_ylabel(f"query {q}", fontsize=6)
    fig.suptitle("Query | regenerated from the same noise after retraining (seed 0)", fontsize=8)
    fig.tight_layout()
    atomic_savefig(path, fig, dpi=110)
    plt.close(fig)
    return path
