"""How well bits per dimension detect adversarial images, computed from a score table alone.

Convention, used everywhere in this module:

* **positive** = an adversarial image whose attack succeeded after rounding to 8 bits
  (``source == "adversarial"`` and ``success``);
* **negative** = the clean original of the same test image (``source == "test"``, same ``model`` and
  ``image_id``), so positives and negatives are paired, ``n_neg == n_pos``;
* **score** = BPD; a higher BPD is more suspicious (an image is flagged when ``bpd > threshold``).

The score table has one row per (model, image): the columns in :data:`COLUMNS`, ``source`` one of
:data:`SOURCES`. ``train_ref`` rows are the training images that p-values are ranked against, ``val`` rows
clean validation images that fix the threshold at a target false-positive rate. ``attack`` and
``epsilon`` are set on adversarial rows only (``epsilon`` NaN for unbounded attacks); ``success`` is the
success after rounding. P-values use the conservative form ``p = (1 + #{ref >= s}) / (n_ref + 1)``
(PixelDefend's rank of an image's BPD among training images, never exactly 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

COLUMNS = (
    "image_id",
    "source",
    "attack",
    "epsilon",
    "model",
    "bpd",
    "bpd_se",
    "label",
    "prediction",
    "success",
)
SOURCES = ("train_ref", "val", "test", "adversarial")
CLEAN_SOURCES = ("train_ref", "val", "test")


class RocCurve(NamedTuple):
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auroc: float


def _scores(values: ArrayLike, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or infinite scores")
    return a


def roc(scores_neg: ArrayLike, scores_pos: ArrayLike) -> RocCurve:
    """ROC curve and AUROC of separating positives (higher scores) from negatives."""
    neg, pos = _scores(scores_neg, "scores_neg"), _scores(scores_pos, "scores_pos")
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    s = np.r_[neg, pos]
    fpr, tpr, thresholds = roc_curve(y, s)
    return RocCurve(fpr, tpr, thresholds, float(roc_auc_score(y, s)))


def _auroc_rows(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUROC of each row pair, neg (R, n), pos (R, m), via Mann-Whitney U with mid-ranks for ties."""
    m = pos.shape[1]
    ranks = rankdata(np.concatenate([neg, pos], axis=1), axis=1)  # (R, n + m)
    u = ranks[:, neg.shape[1] :].sum(1) - m * (m + 1) / 2  # (R,)
    return np.asarray(u / (neg.shape[1] * m))


def bootstrap_auroc_ci(
    scores_neg: ArrayLike,
    scores_pos: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC, resampling each class with replacement (stratified)."""
    neg, pos = _scores(scores_neg, "scores_neg"), _scores(scores_pos, "scores_pos")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // (len(neg) + len(pos)))  # bounds memory to a few 10s of MB
    aucs = []
    for start in range(0, n_boot, chunk):
        r = min(chunk, n_boot - start)
        bn = neg[rng.integers(0, len(neg), (r, len(neg)))]  # (r, n)
        bp = pos[rng.integers(0, len(pos), (r, len(pos)))]  # (r, m)
        aucs.append(_auroc_rows(bn, bp))
    low, high = np.quantile(np.concatenate(aucs), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def threshold_at_fpr(val_clean_scores: ArrayLike, fpr: float = 0.05) -> float:
    """Threshold t with at most ``fpr`` of the clean validation scores above it (flag when ``bpd > t``)."""
    val = _scores(val_clean_scores, "val_clean_scores")
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
    return float(np.quantile(val, 1 - fpr, method="higher"))


def tpr_at_threshold(scores: ArrayLike, threshold: float) -> float:
    """Fraction of ``scores`` flagged, i.e. strictly above ``threshold``."""
    return float((_scores(scores, "scores") > threshold).mean())


def pvalues(scores: ArrayLike, reference_train_scores: ArrayLike) -> np.ndarray:
    """PixelDefend p-value of each score: ``(1 + #{ref >= s}) / (n_ref + 1)``, shape (N,)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    ref = np.sort(_scores(reference_train_scores, "reference_train_scores"))
    at_least = len(ref) - np.searchsorted(ref, s, side="left")  # (N,) #{ref >= s}
    return np.asarray((1 + at_least) / (len(ref) + 1))


def pvalue_detection_rate(scores: ArrayLike, reference_train_scores: ArrayLike, alpha: float = 0.05) -> float:
    """Fraction of images whose p-value is below ``alpha``."""
    return float((pvalues(_scores(scores, "scores"), reference_train_scores) < alpha).mean())


def validate_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Check the score-table schema; return a copy with ``bpd`` as float64."""
    missing = [c for c in COLUMNS if c not in scores.columns]
    if missing:
        raise ValueError(f"score table lacks column(s) {missing}; expected columns {list(COLUMNS)}")
    bad = sorted(set(scores["source"].dropna().astype(str)) - set(SOURCES)) + (
        ["<missing>"] if scores["source"].isna().any() else []
    )
    if bad:
        raise ValueError(f"score table has unknown source(s) {bad}; valid sources: {list(SOURCES)}")
    if scores["model"].isna().any():
        raise ValueError("score table has rows without a model")
    bpd = pd.to_numeric(scores["bpd"], errors="coerce")
    if not np.isfinite(bpd.to_numpy(dtype=np.float64)).all():
        raise ValueError("score table has rows whose bpd is missing, non-numeric or infinite")
    adv = scores["source"] == "adversarial"
    if scores.loc[adv, "attack"].isna().any():
        raise ValueError("adversarial rows must name their attack")
    if scores.loc[~adv, "attack"].notna().any():
        raise ValueError(f"clean rows ({', '.join(CLEAN_SOURCES)}) must have no attack")
    success = scores.loc[adv, "success"]
    if success.isna().any() or not set(success.unique()) <= {True, False}:  # 0/1 compare equal to False/True
        raise ValueError("adversarial rows need a boolean success (after rounding)")
    dup = scores[~adv].duplicated(["model", "source", "image_id"])
    if dup.any():
        first = scores[~adv][dup].iloc[0]
        raise ValueError(
            f"duplicate clean row: model={first['model']!r} source={first['source']!r} "
            f"image_id={first['image_id']!r}"
        )
    out = scores.copy()
    out["bpd"] = bpd.astype(np.float64)
    return out


class DetectionGroup(NamedTuple):
    model: str
    attack: str
    epsilon: float
    neg: np.ndarray
    pos: np.ndarray


def detection_groups(scores: pd.DataFrame) -> Iterator[DetectionGroup]:
    """Per model × attack × epsilon: paired clean (negative) and successful adversarial (positive) BPD."""
    df = validate_scores(scores)
    for model, per_model in df.groupby("model", sort=False):
        test = per_model[per_model["source"] == "test"].set_index("image_id")["bpd"]
        adv = per_model[per_model["source"] == "adversarial"]
        for (attack, eps), group in adv.groupby(["attack", "epsilon"], sort=False, dropna=False):
            hits = group[group["success"].fillna(False).astype(bool)]
            orphans = sorted(set(hits["image_id"]) - set(test.index))
            if orphans:
                raise ValueError(
                    f"model {model!r}, attack {attack!r}: adversarial image_ids without a clean 'test' row, "
                    f"e.g. {orphans[:5]}"
                )
            neg = test.loc[hits["image_id"]].to_numpy(dtype=np.float64)
            yield DetectionGroup(str(model), str(attack), float(eps), neg, hits["bpd"].to_numpy(np.float64))


def with_pvalues(scores: pd.DataFrame) -> pd.DataFrame:
    """The score table with a ``pvalue`` column (ranked against the model's ``train_ref`` rows)."""
    df = validate_scores(scores)
    df["pvalue"] = np.nan
    for _, idx in df.groupby("model", sort=False).groups.items():
        rows = df.loc[idx]
        ref = rows.loc[rows["source"] == "train_ref", "bpd"]
        if len(ref):
            df.loc[idx, "pvalue"] = pvalues(rows["bpd"], ref)
    return df


def _pct(x: float) -> str:
    return f"{100 * x:g}"


def detection_table(
    scores: pd.DataFrame,
    fpr: float = 0.05,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """One row per model × attack × epsilon with AUROC [CI], TPR at ``fpr`` and p-value detection rates.

    Each model needs ``val`` rows (for the threshold) and ``train_ref`` rows (for p-values). Groups
    without a successful adversarial image keep their row with ``n_pos = 0`` and NaN metrics.
    Columns: model, attack, epsilon, n_pos, n_neg, auroc, ci_low, ci_high, ci_level, tpr_at_{100*fpr}fpr (e.g.
    ``tpr_at_5fpr``), threshold, alpha, pvalue_detection_rate (adversarials with p < alpha), pvalue_fpr
    (clean originals with p < alpha), bpd_clean_mean, bpd_adv_mean.
    """
    df = validate_scores(scores)
    tpr_col = f"tpr_at_{_pct(fpr)}fpr"
    rows = []
    for g in detection_groups(df):
        per_model = df[df["model"] == g.model]
        val = per_model.loc[per_model["source"] == "val", "bpd"]
        ref = per_model.loc[per_model["source"] == "train_ref", "bpd"]
        for what, part in (("val", val), ("train_ref", ref)):
            if part.empty:
                raise ValueError(f"model {g.model!r} has no {what!r} rows; the detection table needs them")
        threshold = threshold_at_fpr(val, fpr)
        row = {
            "model": g.model,
            "attack": g.attack,
            "epsilon": g.epsilon,
            "n_pos": len(g.pos),
            "n_neg": len(g.neg),
            "auroc": np.nan,
            "ci_low": np.nan,
            "ci_high": np.nan,
            "ci_level": level,
            tpr_col: np.nan,
            "threshold": threshold,
            "alpha": alpha,
            "pvalue_detection_rate": np.nan,
            "pvalue_fpr": np.nan,
            "bpd_clean_mean": np.nan,
            "bpd_adv_mean": np.nan,
        }
        if len(g.pos):
            low, high = bootstrap_auroc_ci(g.neg, g.pos, n_boot, seed, level)
            row.update(
                auroc=roc(g.neg, g.pos).auroc,
                ci_low=low,
                ci_high=high,
                pvalue_detection_rate=pvalue_detection_rate(g.pos, ref, alpha),
                pvalue_fpr=pvalue_detection_rate(g.neg, ref, alpha),
                bpd_clean_mean=float(g.neg.mean()),
                bpd_adv_mean=float(g.pos.mean()),
                **{tpr_col: tpr_at_threshold(g.pos, threshold)},
            )
        rows.append(row)
    return pd.DataFrame(rows)
