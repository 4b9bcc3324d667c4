"""Figures and ``report.md`` from the score and summary tables.

Figures are ``matplotlib.figure.Figure`` objects built without pyplot, so nothing opens a window or
touches global backend state; saving renders them with the Agg canvas. Every figure function returns
its Figure; :func:`save_figure` writes one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ardetect.detection import DetectionGroup, detection_groups, roc, with_pvalues


def format_epsilon(epsilon: float | None) -> str:
    """``8/255`` for ε on the 1/255 grid, ``0.1`` otherwise, ``—`` for unbounded (None or NaN)."""
    if epsilon is None or math.isnan(epsilon):
        return "—"
    levels = epsilon * 255
    return f"{round(levels)}/255" if abs(levels - round(levels)) < 1e-6 else f"{epsilon:.4g}"


def group_label(attack: str, epsilon: float) -> str:
    return attack if math.isnan(epsilon) else f"{attack} ε={format_epsilon(epsilon)}"


def _grid(n: int, ncols: int, size: float = 3.6) -> tuple[Figure, list[Axes]]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(size * ncols, size * nrows * 0.85), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _by_model(scores: pd.DataFrame) -> dict[str, list[DetectionGroup]]:
    out: dict[str, list[DetectionGroup]] = {}
    for g in detection_groups(scores):
        out.setdefault(g.model, []).append(g)
    return out


def roc_figure(scores: pd.DataFrame) -> Figure:
    """One axes per model, one ROC curve per attack × ε (successful adversarials vs their originals)."""
    groups = _by_model(scores)
    if not groups:
        raise ValueError("the score table has no adversarial rows to draw ROC curves for")
    fig, axes = _grid(len(groups), ncols=3)
    for ax, (model, gs) in zip(axes, groups.items()):
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="chance")
        for g in gs:
            if len(g.pos):
                curve = roc(g.neg, g.pos)
                ax.plot(curve.fpr, curve.tpr, label=f"{group_label(g.attack, g.epsilon)} ({curve.auroc:.3f})")
        ax.set(title=model, xlabel="false-positive rate (clean)", ylabel="true-positive rate (adversarial)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.legend(fontsize=7, loc="lower right", title="attack (AUROC)", title_fontsize=7)
    return fig


def bpd_histogram_figure(scores: pd.DataFrame, bins: int = 40) -> Figure:
    """Rows = models, columns = attack × ε: BPD of the clean originals against their adversarial versions."""
    groups = _by_model(scores)
    if not groups:
        raise ValueError("the score table has no adversarial rows to draw BPD histograms for")
    ncols = max(len(gs) for gs in groups.values())
    fig = Figure(figsize=(3.0 * ncols, 2.4 * len(groups)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), ncols, squeeze=False)
    for i, (model, gs) in enumerate(groups.items()):
        for j in range(ncols):
            ax = axes[i, j]
            if j >= len(gs):
                ax.set_visible(False)
                continue
            g = gs[j]
            ax.set_title(f"{model}: {group_label(g.attack, g.epsilon)}", fontsize=8)
            if len(g.pos):
                edges = np.histogram_bin_edges(np.r_[g.neg, g.pos], bins=bins)
                ax.hist(g.neg, bins=edges.tolist(), alpha=0.5, density=True, label="clean")
                ax.hist(g.pos, bins=edges.tolist(), alpha=0.5, density=True, label="adversarial")
                ax.legend(fontsize=7)
            else:
                ax.text(
                    0.5, 0.5, "no successful\nadversarials", ha="center", va="center", transform=ax.transAxes
                )
            ax.set_xlabel("BPD", fontsize=8)
    return fig


def pvalue_histogram_figure(scores: pd.DataFrame, bins: int = 20) -> Figure:
    """One axes per model: p-values of clean test images and of each attack's successful adversarials."""
    df = with_pvalues(scores)
    models = [m for m in df["model"].unique() if df.loc[df["model"] == m, "pvalue"].notna().any()]
    if not models:
        raise ValueError("no model has train_ref rows, so there are no p-values to draw")
    fig, axes = _grid(len(models), ncols=3)
    edges = np.linspace(0, 1, bins + 1).tolist()
    for ax, model in zip(axes, models):
        rows = df[df["model"] == model]
        ax.hist(
            rows.loc[rows["source"] == "test", "pvalue"],
            bins=edges,
            density=True,
            histtype="step",
            linewidth=2,
            color="black",
            label="clean test",
        )
        adv = rows[(rows["source"] == "adversarial") & rows["success"].fillna(False).astype(bool)]
        for (attack, eps), group in adv.groupby(["attack", "epsilon"], sort=False, dropna=False):
            ax.hist(
                group["pvalue"],
                bins=edges,
                density=True,
                histtype="step",
                label=group_label(str(attack), float(eps)),
            )
        ax.axvline(0.05, color="gray", linestyle=":")
        ax.set(title=model, xlabel="p-value (vs training BPD)", ylabel="density")
        ax.legend(fontsize=7)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write ``fig`` (PNG/SVG/PDF by suffix), creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def format_detection_table(table: pd.DataFrame) -> pd.DataFrame:
    """The detection table as report columns: AUROC [CI], TPR at the target FPR, p-value rates, BPD means."""
    tpr_cols = [c for c in table.columns if c.startswith("tpr_at_")]
    levels = table["ci_level"].unique()
    ci = f"{100 * levels[0]:g}% CI" if len(levels) == 1 else "CI"
    out = pd.DataFrame(
        {
            "model": table["model"],
            "attack": table["attack"],
            "ε": [format_epsilon(e) for e in table["epsilon"]],
            "n": table["n_pos"],
            f"AUROC [{ci}]": [
                "—" if math.isnan(a) else f"{a:.3f} [{lo:.3f}, {hi:.3f}]"
                for a, lo, hi in zip(table["auroc"], table["ci_low"], table["ci_high"])
            ],
        }
    )
    for c in tpr_cols:
        out[c.replace("tpr_at_", "TPR@").replace("fpr", "%FPR")] = table[c]
    alphas = table["alpha"].unique()
    alpha = f"{alphas[0]:g}" if len(alphas) == 1 else "α"
    out[f"p<{alpha} adv"] = table["pvalue_detection_rate"]
    out[f"p<{alpha} clean"] = table["pvalue_fpr"]
    out["BPD clean"] = table["bpd_clean_mean"]
    out["BPD adv"] = table["bpd_adv_mean"]
    return out


def _markdown(df: pd.DataFrame) -> str:
    """A pipe table with 3 decimals; missing values (NaN) print as ``—``."""
    cells = df.astype(object).where(df.notna(), None)
    return str(cells.to_markdown(index=False, floatfmt=".3f", missingval="—"))


def write_report(
    path: str | os.PathLike[str],
    *,
    classifier: pd.DataFrame | None = None,
    attacks: pd.DataFrame | None = None,
    detection: pd.DataFrame | None = None,
    figures: Mapping[str, str | os.PathLike[str]] | None = None,
    title: str = "Detecting adversarial examples by bits per dimension",
    notes: str = "",
) -> Path:
    """Write ``report.md``: classifier accuracy, attack success, detection metrics and figure links.

    ``attacks`` is :func:`ardetect.attacks.attack_summary`'s table, ``detection``
    :func:`ardetect.detection.detection_table`'s; ``figures`` maps captions to image paths, linked
    relative to the report's folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""]
    if notes:
        parts += [notes.strip(), ""]
    if classifier is not None:
        parts += ["## Classifier accuracy", "", _markdown(classifier), ""]
    if attacks is not None:
        if "epsilon" in attacks.columns:
            attacks = attacks.assign(epsilon=[format_epsilon(e) for e in attacks["epsilon"]])
        parts += ["## Attack success (before / after rounding to 8 bits)", "", _markdown(attacks), ""]
    if detection is not None:
        parts += [
            "## Detection by BPD",
            "",
            "Positive = successful adversarial (after rounding), negative = its clean original, "
            "score = BPD (higher = more suspicious). The TPR threshold is set on clean validation images; "
            "p-values rank an image's BPD among training images (fraction of adversarial / clean images "
            "with p below the level).",
            "",
            _markdown(format_detection_table(detection)),
            "",
        ]
    if figures:
        parts += ["## Figures", ""]
        for caption, fig_path in figures.items():
            rel = Path(os.path.relpath(Path(fig_path), path.parent)).as_posix()
            parts += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    path.write_text("\n".join(parts))
    return path
