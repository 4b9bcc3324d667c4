"""Figures and ``report.md`` from the score and summary tables.

Figures are ``matplotlib.figure.Figure`` objects built without pyplot, so nothing opens a window or
touches global backend state; saving renders them with the Agg canvas. Every figure function returns
its Figure; :func:`save_figure` writes one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ardetect import layout
from ardetect.attacksets import CONTROLS, AttackSet, format_epsilon, sorted_sets
from ardetect.detection import (
    MIN_CELL,
    DetectionGroup,
    attack_outcomes,
    detection_groups,
    roc,
    threshold_at_fpr,
    with_pvalues,
)
from ardetect.io import write_json


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
                ax.plot(curve.fpr, curve.tpr, label=f"{g.attack_set.label} ({curve.auroc:.3f})")
        ax.set(title=model, xlabel="false-positive rate (clean)", ylabel="true-positive rate (adversarial)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.legend(fontsize=7, loc="lower right", title="attack (AUROC)", title_fontsize=7)
    return fig


def score_axis_label(model: str) -> str:
    """What a score-table model's ``bpd`` column holds (``conditional`` and ``detection.with_combined``)."""
    if model.endswith("-combined"):
        return "-log10 of the smaller calibrated p-value"
    if model.endswith("-disagree"):
        return "generative disagreement -log2 p_gen(ŷ | x) / D"
    if model.endswith("-pred"):
        return "bits per dimension given ŷ"
    if model.endswith("-surprise"):
        return "surprise: mean of the largest per-pixel -log2 p(x_i | x_<i, ŷ)"
    return "bits per dimension"


DISAGREE_FLOOR = 1e-5  # bits/dim; at D = 784 a disagreement below it means p_gen(ŷ | x) > 0.994


def density_axis(model: str) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """How ``bpd_density_figure`` draws a model's score: the generative disagreement on a log10 axis
    (a third of clean images score exactly 0 and the rest span ten decades: linear, the panel is one
    spike at 0), floored at ``DISAGREE_FLOOR``; every other score as it is."""
    if model.endswith("-disagree"):
        label = f"log10 disagreement, bits/dim (≥ {DISAGREE_FLOOR:g})"
        return (lambda v: np.log10(np.maximum(v, DISAGREE_FLOOR))), label
    return (lambda v: np.asarray(v, dtype=float)), score_axis_label(model)


def bpd_density_figure(scores: pd.DataFrame, fpr: float = 0.05) -> Figure:
    """One panel per model (PixelDefend's figure): BPD densities of the clean originals and of each
    attack family at its smallest ε, overlaid (Gaussian KDE; a family with < 2 distinct values is a rug),
    and the detection threshold calibrated at ``fpr`` on the model's ``calib`` rows (dashed); the axis
    of each model's score is ``density_axis``'s."""
    from scipy import stats  # lazily: importing scipy.stats costs ~2 s in every importing stage

    groups = _by_model(scores)
    if not groups:
        raise ValueError("the score table has no adversarial rows to draw BPD densities for")
    fig, axes = _grid(len(groups), ncols=3, size=4.2)
    for ax, (model, gs) in zip(axes, groups.items()):
        firsts: dict[str, DetectionGroup] = {}
        for g in gs:  # report order: the smallest ε of each family comes first
            if len(g.pos):
                firsts.setdefault(g.attack, g)
        shown, xlabel = density_axis(model)
        rows = scores[scores["model"] == model]
        attacked = rows.loc[rows["source"] == "adversarial", "image_id"]
        originals = rows[(rows["source"] == "test") & rows["image_id"].isin(attacked)]  # each image once
        clean = shown(originals["bpd"].to_numpy())
        curves = [("clean originals", clean, "black")] + [
            (f"{g.attack_set.label} (n={len(g.pos)})", shown(g.pos), None) for g in firsts.values()
        ]
        values = np.concatenate([v for _, v, _ in curves])
        lo, hi = np.quantile(values, [0.002, 0.998])
        pad = 0.05 * (hi - lo) or 0.5  # every value equal: a unit-wide axis around it
        grid = np.linspace(lo - pad, hi + pad, 400)
        for label, v, color in curves:
            if len(np.unique(v)) < 2:
                ax.plot(v, np.zeros_like(v), "|", markersize=12, color=color, label=label)
                continue
            kw = {"color": color, "linewidth": 2.2} if color else {"linewidth": 1.4}
            ax.plot(grid, stats.gaussian_kde(v)(grid), label=label, **kw)
        calib = rows.loc[rows["source"] == "calib", "bpd"]
        if len(calib):
            tau = threshold_at_fpr(calib, fpr)
            line = float(shown(np.array([tau]))[0])
            ax.axvline(line, color="gray", linestyle="--", label=f"threshold at {fpr:.0%} FPR ({tau:.3g})")
        ax.set(title=model, xlabel=xlabel, ylabel="density")
        ax.set_xlim(grid[0], grid[-1])
        ax.legend(fontsize=7)
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
        positive = rows["success"].fillna(False).astype(bool) | rows["attack"].isin(CONTROLS)
        adv = rows[(rows["source"] == "adversarial") & positive]
        for (attack, eps), group in adv.groupby(["attack", "epsilon"], sort=False, dropna=False):
            ax.hist(
                group["pvalue"],
                bins=edges,
                density=True,
                histtype="step",
                label=AttackSet.of(attack, eps).label,
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


SMALL_MARK = "†"


#: The detect stage's figures (file name → caption in report.md).
DETECTION_FIGURES = {
    "roc.png": "ROC curves (successful adversarials vs their clean originals)",
    "bpd_densities.png": "BPD densities: clean originals and each attack family (smallest ε)",
    "pvalues.png": "PixelDefend p-values",
}


def save_detection_figures(scores: pd.DataFrame, fpr: float, folder: Path) -> list[Path]:
    """Write the ``DETECTION_FIGURES`` for the score table into ``folder``."""
    figures = (roc_figure(scores), bpd_density_figure(scores, fpr), pvalue_histogram_figure(scores))
    return [save_figure(fig, folder / name) for fig, name in zip(figures, DETECTION_FIGURES)]


def _set_label(table: pd.DataFrame) -> list[str]:
    return [AttackSet.of(a, e).label for a, e in zip(table["attack"], table["epsilon"])]


def format_detection_table(table: pd.DataFrame) -> pd.DataFrame:
    """The detection table as report columns: AUROC [paired CI], TPR and realized FPR at the calibrated
    threshold, p-value rates, BPD means; cells with n < MIN_CELL carry a dagger."""
    tpr_cols = [c for c in table.columns if c.startswith("tpr_at_")]
    levels = table["ci_level"].unique()
    ci = f"{100 * levels[0]:g}% CI" if len(levels) == 1 else "CI"
    out = pd.DataFrame(
        {
            "model": table["model"],
            "set": _set_label(table),
            "n": [
                f"{n}{SMALL_MARK}" if small else str(n) for n, small in zip(table["n_pos"], table["small"])
            ],
            f"AUROC [{ci}]": [
                "—" if math.isnan(a) else f"{a:.3f} [{lo:.3f}, {hi:.3f}]"
                for a, lo, hi in zip(table["auroc"], table["ci_low"], table["ci_high"])
            ],
        }
    )
    for c in tpr_cols:
        out[c.replace("tpr_at_", "TPR@").replace("fpr", "%FPR")] = table[c]
    out["FPR realized"] = table["fpr"]
    alphas = table["alpha"].unique()
    alpha = f"{alphas[0]:g}" if len(alphas) == 1 else "α"
    out[f"p<{alpha} adv"] = table["pvalue_detection_rate"]
    out[f"p<{alpha} clean"] = table["pvalue_fpr"]
    out["BPD clean"] = table["bpd_clean_mean"]
    out["BPD adv"] = table["bpd_adv_mean"]
    return out


def auroc_matrix(table: pd.DataFrame) -> pd.DataFrame:
    """Models × attack sets (report order, ε numeric): AUROC as text; cells with n < MIN_CELL are shown
    in parentheses with a dagger, empty cells as —."""
    sets = sorted(
        {AttackSet.of(a, e) for a, e in zip(table["attack"], table["epsilon"])}, key=lambda s: s.sort_key
    )
    models = list(dict.fromkeys(table["model"]))
    cells = {(r.model, r.set): r for r in table.itertuples()}
    out = pd.DataFrame(index=pd.Index(models, name="model"), columns=[s.label for s in sets], dtype=object)
    for model in models:
        for s in sets:
            r = cells.get((model, s.slug))
            if r is None or math.isnan(r.auroc):
                out.loc[model, s.label] = "—"
            else:
                out.loc[model, s.label] = f"({r.auroc:.2f}){SMALL_MARK}" if r.small else f"{r.auroc:.3f}"
    return out.reset_index()


def adaptive_comparison(
    scores: pd.DataFrame, meta: Mapping[str, Any], fpr: float
) -> tuple[pd.DataFrame | None, str]:
    """Each adaptive set next to its oblivious counterpart on the same originals, for the attacked model
    (``meta``: the adaptive stage's metrics: model, threshold, scale, and the attack on the conditional
    detector under ``conditional``); the table and its caption."""
    if not meta:
        return None, ""
    parts = [_comparison(scores, meta["model"], "adaptive_", fpr)]
    cond = meta.get("conditional")
    if cond:
        parts.append(_comparison(scores, f"{cond['model']}-combined", "adaptive_cond_", fpr))
    found = [(t, ids, headline) for t, ids, headline in parts if t is not None]
    if not found:
        return None, ""
    notes = [
        f"The attacker knows the detector: {meta['model']}'s BPD and its threshold "
        f"τ = {meta['threshold']:.4f} bits/dim ({fpr:.0%} FPR on clean calibration images), through "
        f"Carlini & Wagner's K+1 logit (detected = max_k z_k + {meta['scale']:g} · (BPD − τ), the scale "
        "chosen by the strength sweep), with BPDA through the 8-bit rounding and each pixel's likelihood "
        f"relaxed between levels. Same {len(found[0][1])} originals for both rows of a pair. "
        f"**{found[0][2]}.** `classifier_success`: fooled after rounding; `evasion_rate`: among those, "
        "not flagged (1 − `tpr`); `joint_success`: fooled and not flagged; `auroc`/`tpr`: the detector "
        "on the fooling ones against their clean originals."
    ]
    if cond and len(found) > 1:
        th = cond["thresholds"]
        notes.append(
            f"Against the class-conditional detector ({cond['model']}-combined: flagged when the "
            f"surprise under p(x | ŷ) exceeds {th['surprise']:.3f} bits/pixel or the generative "
            f"disagreement −log2 p_gen(ŷ | x)/D exceeds {th['disagree']:.5f}, the union of two calibrated "
            f"p-values at {fpr:.0%} FPR), the same attacks use detected = max_k z_k + {meta['scale']:g} · "
            "max(surprise − τ_sur, disagreement − τ_dis), both taken with the classifier's current label, on "
            f"{len(found[1][1])} originals. **{found[1][2]}.**"
        )
    return pd.concat([t for t, _, _ in found], ignore_index=True), "\n\n".join(notes)


def _comparison(
    scores: pd.DataFrame, model: str, prefix: str, fpr: float
) -> tuple[pd.DataFrame | None, np.ndarray, str]:
    """``model``'s detector against the adaptive sets named ``prefix*`` (not the conditional ones for the
    plain prefix) and their oblivious counterparts on the same originals."""
    adv = scores[(scores["source"] == "adversarial") & scores["attack"].str.startswith(prefix)]
    if prefix == "adaptive_":
        adv = adv[~adv["attack"].str.startswith("adaptive_cond_")]
    adv = adv[adv["model"] == model]
    if adv.empty:
        return None, np.zeros(0), ""
    ids = adv["image_id"].unique()
    sets = sorted_sets(AttackSet.of(a, e) for a, e in zip(adv["attack"], adv["epsilon"]))
    pairs = [x for s in sets for x in (s.oblivious, s)]
    table = attack_outcomes(scores, model, pairs, ids, fpr)
    table.insert(0, "model", model)
    headline = "; ".join(
        f"{r['set']}: {r['joint_success']:.0%} fool the classifier *and* stay unflagged "
        f"(oblivious: {o['joint_success']:.0%})"
        for (_, o), (_, r) in zip(table.iloc[::2].iterrows(), table.iloc[1::2].iterrows())
    )
    return table, ids, headline


def _markdown(df: pd.DataFrame) -> str:
    """A pipe table with 3 decimals; missing values (NaN) print as ``—``."""
    cells = df.astype(object).where(df.notna(), None)
    return str(cells.to_markdown(index=False, floatfmt=".3f", missingval="—"))


def _attack_section(attacks: pd.DataFrame) -> list[str]:
    """report.md's attack-success table (ε as a fraction of 255)."""
    if "epsilon" in attacks.columns:
        attacks = attacks.assign(epsilon=[format_epsilon(e) for e in attacks["epsilon"]])
    return [
        "## Attack success (before / after rounding to 8 bits)",
        "",
        "`failed`: images where the attack returned its failure sentinel (Carlini-Wagner's all-zero "
        "image); they count as failures everywhere. Noise is a control: all its images are scored.",
        "",
        _markdown(attacks),
        "",
    ]


def write_report(
    path: str | os.PathLike[str],
    *,
    classifier: pd.DataFrame | None = None,
    attacks: pd.DataFrame | None = None,
    detection: pd.DataFrame | None = None,
    adaptive: pd.DataFrame | None = None,
    adaptive_notes: str = "",
    fpr: pd.DataFrame | None = None,
    figures: Mapping[str, str | os.PathLike[str]] | None = None,
    sections: Sequence[str] = (),
    title: str = "Detecting adversarial examples by bits per dimension",
    notes: str = "",
) -> Path:
    """Write ``report.md``: the AUROC matrix first, then the oblivious-vs-adaptive comparison
    (``adaptive``), the realized false-positive rates (``fpr``), classifier and attack tables, the
    long detection table, the other stages' ``sections`` (markdown, each with its ``##`` heading),
    and figure links (relative to the report's folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""]
    if notes:
        parts += [notes.strip(), ""]
    small_note = (
        f"{SMALL_MARK} fewer than {MIN_CELL} positives: too few to quote (kept out of headline tables)."
    )
    if detection is not None:
        parts += [
            "## AUROC by model and attack set",
            "",
            _markdown(auroc_matrix(detection)),
            "",
            small_note,
            "",
        ]
    if adaptive is not None:
        parts += ["## Oblivious vs adaptive attacks", ""]
        if adaptive_notes:
            parts += [adaptive_notes.strip(), ""]
        parts += [_markdown(adaptive), ""]
    if fpr is not None:
        parts += [
            "## False-positive rate realized on clean test images",
            "",
            "The threshold is set on clean calibration images drawn from the test pool and disjoint from "
            "the evaluated ones; the rate below is measured on every evaluated clean test image.",
            "",
            _markdown(fpr),
            "",
        ]
    if classifier is not None:
        parts += ["## Classifier accuracy", "", _markdown(classifier), ""]
    if attacks is not None:
        parts += _attack_section(attacks)
    if detection is not None:
        parts += [
            "## Detection by BPD",
            "",
            "Positive = successful adversarial (after rounding; every image for the noise control), "
            "negative = its clean original, score = BPD (higher = more suspicious). AUROC intervals "
            "resample (adversarial, original) pairs. The TPR threshold is set on clean calibration images "
            "from the test pool; `FPR realized` is the rate it flags among this row's clean originals. "
            "p-values rank an image's BPD among training images (fraction of adversarial / clean images "
            "with p below the level).",
            "",
            _markdown(format_detection_table(detection)),
            "",
            small_note,
            "",
        ]
    parts += [part for block in sections for part in (block.strip(), "")]
    if figures:
        parts += ["## Figures", ""]
        for caption, fig_path in figures.items():
            rel = Path(os.path.relpath(Path(fig_path), path.parent)).as_posix()
            parts += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    path.write_text("\n".join(parts))
    return path


#: The attack sets in the headline metrics (``dvc metrics show``): the smallest ε of each family, the
#: minimal attacks and the adaptive attack; everything else is in report.md and detection.json.
HEADLINE_SETS = ("noise_e8", "fgsm_e8", "pgd_e8", "deepfool", "cw", "cw_conf", "adaptive_pgd_e8")


def headline_metrics(
    train: Mapping[str, Mapping[str, float]],
    detection: pd.DataFrame,
    extra: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """One small dict per density model with the same keys, so ``dvc metrics show`` prints a compact
    table (a row per model): ``test_bpd``, the AUROC of each set in ``HEADLINE_SETS`` (cells with fewer
    than MIN_CELL positives left out, as in the report), then ``extra[model]`` (other stages' headline
    numbers). Missing cells are left out rather than written as NaN."""
    out: dict[str, dict[str, float]] = {}
    scored = list(dict.fromkeys(detection["model"]))
    for model, m in _with_derived(train, scored).items():
        row = {"test_bpd": round(float(m["test_bpd"]), 4)}
        cells = detection[(detection["model"] == model) & ~detection["small"].astype(bool)]
        by_set = dict(zip(cells["set"], cells["auroc"]))
        row |= {s: round(float(by_set[s]), 4) for s in HEADLINE_SETS if np.isfinite(by_set.get(s, np.nan))}
        row |= {k: round(float(v), 4) for k, v in (extra or {}).get(model, {}).items() if np.isfinite(v)}
        out[model] = row
    return out


def _with_derived(
    train: Mapping[str, Mapping[str, float]], scored: Sequence[str]
) -> dict[str, Mapping[str, float]]:
    """``train`` with each derived detector of a conditional model (``m-pred``, ``m-disagree``,
    ``m-surprise``, ``m-combined``) after its model, sharing the model's training metrics."""
    out: dict[str, Mapping[str, float]] = {}
    for model, m in train.items():
        out[model] = m
        out |= {d: m for d in scored if d.startswith(f"{model}-")}
    return out


def conditional_section(train: Mapping[str, Mapping[str, float]], detection: pd.DataFrame) -> str:
    """report.md's section on the class-conditional models: likelihoods, the generative classifier and
    the five detectors each one yields, on the minimal attacks and the adaptive ones."""
    rows = []
    for model, m in train.items():
        if "gen_accuracy" not in m:
            continue
        rows.append(
            {
                "model": model,
                "test bpd (marginal)": m["test_bpd"],
                "test bpd given y": m["test_cond_bpd"],
                "generative accuracy": m["gen_accuracy"],
                "test images": int(m["test_marginal_images"]),
            }
        )
    if not rows:
        return ""
    names = [
        d
        for r in rows
        for d in [r["model"], *(f"{r['model']}-{s}" for s in ("pred", "disagree", "surprise", "combined"))]
    ]
    cells = detection[detection["model"].isin(names)]
    pivot = cells.pivot_table(index="model", columns="set", values="auroc", sort=False).reindex(names)
    return "\n".join([
        "## Class-conditional detector",
        "",
        "A conditional PixelCNN p(x | y) (the label a learned bias and a per-class map in every layer) "
        "gives five detectors: `m` the marginal BPD, -log2 p(x)/D with "
        "p(x) = (1/K) Σ_y p(x | y); `m-pred` the BPD given the classifier's label ŷ; `m-disagree` the "
        "generative disagreement -log2 p_gen(ŷ | x)/D = (log Σ_y p(x | y) - log p(x | ŷ))/(D ln 2); "
        "`m-surprise` the mean of the largest per-pixel -log2 p(x_i | x_<i, ŷ) (the pixels an attack made "
        "improbable, which a sum over all D pixels dilutes); `m-combined` the smaller of the calibrated "
        "p-values of `m-surprise` and `m-disagree` (-log10; thresholds on calib only). The generative "
        "classifier is argmax_y p(x | y).",
        "",
        _markdown(pd.DataFrame(rows)),
        "",
        "AUROC (every attack set; cells with few positives are marked in the matrix above):",
        "",
        _markdown(pivot.reset_index().rename_axis(columns=None)),
        "",
    ])  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DetectOutputs:
    """What the detect stage wrote (data/detect), read back for report.md."""

    detection: pd.DataFrame
    fpr: pd.DataFrame
    adaptive: pd.DataFrame | None
    adaptive_notes: str
    figures: dict[str, Path]  # caption → file

    @classmethod
    def read(cls, folder: Path) -> DetectOutputs:
        adaptive = folder / "adaptive.csv"
        return cls(
            detection=pd.read_csv(folder / "detection.csv"),
            fpr=pd.read_csv(folder / "fpr.csv"),
            adaptive=pd.read_csv(adaptive) if adaptive.is_file() else None,
            adaptive_notes=(folder / "adaptive.md").read_text() if adaptive.is_file() else "",
            figures={caption: folder / name for name, caption in DETECTION_FIGURES.items()},
        )


def evaluation_notes(dataset: str, binarization: str, fpr: float, num_calib: int, num_train_ref: int) -> str:
    """The report's opening paragraph: the data and the detection convention."""
    return (
        f"Dataset `{dataset}`, binarisation `{binarization}`. Positive = adversarial image that still fools "
        "the classifier after rounding to 8 bits; negative = its clean original; score = BPD (higher = more "
        f"suspicious). Threshold at {fpr:.0%} FPR on {num_calib} clean calibration images from the test "
        f"pool, disjoint from the evaluated ones; p-values against {num_train_ref} training images per model."
    )


def publish_report(
    folder: Path,
    detect: DetectOutputs,
    *,
    classifier: Mapping[str, float],
    attacks: pd.DataFrame,
    notes: str,
    sections: Sequence[str] = (),
    figures: Mapping[str, Path] | None = None,
) -> Path:
    """``folder/report.md`` with every figure copied next to it (a self-contained folder to share or log)."""
    shown = {**detect.figures, **(figures or {})}
    copied = {caption: Path(shutil.copy2(f, folder / f.name)) for caption, f in shown.items() if f.is_file()}
    return write_report(
        folder / "report.md",
        classifier=pd.DataFrame([{"metric": k, "value": v} for k, v in classifier.items()]),
        attacks=attacks,
        detection=detect.detection,
        adaptive=detect.adaptive,
        adaptive_notes=detect.adaptive_notes,
        fpr=detect.fpr,
        figures=copied,
        sections=sections,
        notes=notes,
    )


# Other stages' figures that report.md shows (caption → file), next to the detect stage's.
STAGE_FIGURES = {
    "Adaptive PGD strength sweep: BPD of the iterate per step": layout.ADAPTIVE / "sweep.png",
    "Out-of-distribution sets: BPD histograms per model": layout.OOD / "ood_bpd.png",
}


def write_headline(folder: Path, headline: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``folder/<model>.json`` per density model (``dvc metrics show``: one row each); returns the same
    numbers flat as ``<model>/<key>`` for the tracking run."""
    folder.mkdir()
    for model, row in headline.items():
        write_json(folder / f"{model}.json", row)
    return {f"{m}/{k}": v for m, r in headline.items() for k, v in r.items()}


def adaptive_cells(adaptive: pd.DataFrame | None) -> dict[str, float]:
    """The adaptive-vs-oblivious table as ``<model>/<set>/<column>`` cells (empty without adaptive sets)."""
    if adaptive is None:
        return {}
    rows = adaptive.set_index(["model", "set"])[
        ["classifier_success", "evasion_rate", "joint_success", "auroc"]
    ]
    return {f"{m}/{s}/{c}": v for (m, s), r in rows.iterrows() for c, v in r.items()}
