"""How well bits per dimension detect adversarial images, computed from a score table alone.

Convention, used everywhere in this module:

* **positive** = an adversarial image whose attack succeeded after rounding to 8 bits
  (``source == "adversarial"`` and ``success``); for a control set (noise) every image;
* **negative** = the clean original of the same test image (``source == "test"``, same ``model`` and
  ``image_id``), so positives and negatives are paired, ``n_neg == n_pos``, and the bootstrap
  resamples *pairs*;
* **score** = BPD; a higher BPD is more suspicious (an image is flagged when ``bpd > threshold``).

The score table has one row per (model, image): the columns in :data:`COLUMNS`, ``source`` one of
:data:`SOURCES`. ``train_ref`` rows are the training images that p-values are ranked against; ``calib``
rows are clean *test-distribution* images, disjoint from every ``test`` row, that fix the threshold at a
target false-positive rate (so the rate realized on the clean originals, reported as ``fpr``, is the
target up to sampling error). ``attack`` and ``epsilon`` are set on adversarial rows only (``epsilon``
NaN for unbounded attacks); ``success`` is the success after rounding. P-values use the conservative
form ``p = (1 + #{ref >= s}) / (n_ref + 1)`` (PixelDefend's rank of an image's BPD among training
images, never exactly 0).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from pydantic import NonNegativeInt, PositiveInt

from ardetect.attacksets import AttackSet
from ardetect.configs import Fraction, config_dataclass

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
SOURCES = ("train_ref", "calib", "test", "adversarial")
CLEAN_SOURCES = ("train_ref", "calib", "test")
#: Cells with fewer positives than this are flagged in reports and kept out of headline tables.
MIN_CELL = 30


@config_dataclass
class DetectParams:
    """``detect`` in params.yaml."""

    fpr: Fraction = 0.05  # target false-positive rate, calibrated on clean test images (score.num_calib)
    alpha: Fraction = 0.05  # p-value level (PixelDefend)
    n_boot: PositiveInt = 1000  # bootstrap resamples for the AUROC interval
    level: Fraction = 0.95
    seed: NonNegativeInt = 0


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
    from sklearn.metrics import roc_auc_score, roc_curve  # lazily: importing sklearn costs ~3 s

    neg, pos = _scores(scores_neg, "scores_neg"), _scores(scores_pos, "scores_pos")
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    s = np.r_[neg, pos]
    fpr, tpr, thresholds = roc_curve(y, s)
    return RocCurve(fpr, tpr, thresholds, float(roc_auc_score(y, s)))


def _auroc_rows(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUROC of each row pair, neg (R, n), pos (R, m), via Mann-Whitney U with mid-ranks for ties."""
    from scipy.stats import rankdata

    m = pos.shape[1]
    ranks = rankdata(np.concatenate([neg, pos], axis=1), axis=1)  # (R, n + m)
    u = ranks[:, neg.shape[1] :].sum(1) - m * (m + 1) / 2  # (R,)
    return np.asarray(u / (neg.shape[1] * m))


def _auroc_statistic(neg: np.ndarray, pos: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC along ``axis`` for any batch shape (the vectorized statistic ``scipy.stats.bootstrap`` calls)."""
    neg, pos = np.moveaxis(neg, axis, -1), np.moveaxis(pos, axis, -1)
    batch = neg.shape[:-1]
    return _auroc_rows(neg.reshape(-1, neg.shape[-1]), pos.reshape(-1, pos.shape[-1])).reshape(batch)


def bootstrap_auroc_ci(
    scores_neg: ArrayLike,
    scores_pos: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    paired: bool = True,
) -> tuple[float, float]:
    """Bootstrap CI of the AUROC (BCa; percentile where BCa is undefined, e.g. every resample at 1).

    ``paired`` (the default, for adversarials and their own clean originals): ``neg[i]`` and ``pos[i]``
    are one image before and after the attack, so resample image indices and keep the pairs together
    (``scipy.stats.bootstrap(paired=True)``). Resampling the two groups independently ignores the
    positive correlation of a pair's BPDs and gives intervals several times too wide.
    ``paired=False`` resamples each class on its own (independent samples). On correlated synthetic
    pairs (n = 60) the paired BCa interval covers the true AUROC 93% of the time at the 95% level, the
    paired percentile one 90.5%, the unpaired one 100% (2.5x wider): ``tests/test_evaluation.py``.
    """
    neg, pos = _scores(scores_neg, "scores_neg"), _scores(scores_pos, "scores_pos")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if paired and len(neg) != len(pos):
        raise ValueError(
            f"paired scores need equal lengths, got {len(neg)} negatives and {len(pos)} positives"
        )
    if len(neg) < 2 or len(pos) < 2:
        return float("nan"), float("nan")
    from scipy.stats import DegenerateDataWarning, bootstrap

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateDataWarning)  # BCa undefined: percentile below
            warnings.simplefilter("ignore", RuntimeWarning)  # its 0/0 on the way there
            res = bootstrap(
                (neg, pos),
                _auroc_statistic,
                paired=paired,
                vectorized=True,
                n_resamples=n_boot,
                batch=max(1, 2_000_000 // (len(neg) + len(pos))),  # bounds memory to a few 10s of MB
                confidence_level=level,
                method=method,
                rng=np.random.default_rng(seed),
            )
        low, high = res.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            break
    return float(low), float(high)


def threshold_at_fpr(calib_clean_scores: ArrayLike, fpr: float = 0.05) -> float:
    """Threshold t with at most ``fpr`` of the clean calibration scores above it (flag when ``bpd > t``).

    Calibrate on clean images from the distribution the negatives come from (the test pool), disjoint
    from the images that are evaluated, and report the FPR realized on those (:func:`tpr_at_threshold`
    of the negatives).
    """
    val = _scores(calib_clean_scores, "calib_clean_scores")
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
    attack_set: AttackSet
    neg: np.ndarray
    pos: np.ndarray

    @property
    def attack(self) -> str:
        return self.attack_set.attack

    @property
    def epsilon(self) -> float:
        """ε, NaN when unbounded (table convention)."""
        return self.attack_set.epsilon_or_nan


def detection_groups(scores: pd.DataFrame) -> Iterator[DetectionGroup]:
    """Per model × attack set (in report order): paired clean (negative) and adversarial (positive) BPD.

    Positives are the successful adversarials; for a control set (noise) every image, since a control
    measures what any perturbation of that size does to BPD and must not be filtered by the classifier.
    """
    df = validate_scores(scores)
    for model, per_model in df.groupby("model", sort=False):
        test = per_model[per_model["source"] == "test"].set_index("image_id")["bpd"]
        adv = per_model[per_model["source"] == "adversarial"]
        groups = {
            AttackSet.of(attack, eps): group
            for (attack, eps), group in adv.groupby(["attack", "epsilon"], sort=False, dropna=False)
        }
        for attack_set in sorted(groups, key=lambda a: a.sort_key):
            group = groups[attack_set]
            hits = group if attack_set.is_control else group[group["success"].fillna(False).astype(bool)]
            orphans = sorted(set(hits["image_id"]) - set(test.index))
            if orphans:
                raise ValueError(
                    f"model {model!r}, set {attack_set.slug!r}: adversarial image_ids without a clean 'test' "
                    f"row, e.g. {orphans[:5]}"
                )
            neg = test.loc[hits["image_id"]].to_numpy(dtype=np.float64)
            yield DetectionGroup(str(model), attack_set, neg, hits["bpd"].to_numpy(np.float64))


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


COMBINED = ("-surprise", "-disagree")  # the scores of a conditional model ``m`` that ``m-combined`` unites


def combined_rows(table: pd.DataFrame, model: str) -> pd.DataFrame:
    """Rows of ``model-combined``: for every image scored by ``model-surprise`` and ``model-disagree``,
    -log10 of the smaller of the two p-values against each score's ``calib`` rows (the union of two
    detectors: a few improbable pixels under p(x | ŷ), or a label the generative classifier doubts)."""
    parts = []
    for suffix in COMBINED:
        rows = table[table["model"] == model + suffix].reset_index(drop=True)
        calib = rows.loc[rows["source"] == "calib", "bpd"]
        if calib.empty:
            raise ValueError(f"model {model + suffix!r} has no calib rows to rank p-values against")
        parts.append((rows, pvalues(rows["bpd"], calib)))
    (first, p_first), (second, p_second) = parts
    key = ["source", "attack", "epsilon", "image_id"]
    if not first[key].fillna(-1).equals(second[key].fillna(-1)):
        raise ValueError(
            f"{model}{COMBINED[0]} and {model}{COMBINED[1]} must score the same images in the same order"
        )
    out = first.copy()
    out["model"] = model + "-combined"
    out["bpd"] = -np.log10(np.minimum(p_first, p_second))
    out["bpd_se"] = 0.0
    return out


def union_thresholds(calib: np.ndarray, fpr: float) -> tuple[float, ...]:
    """Per-score thresholds of the ``-combined`` detector: with calib scores (N, J), an image is flagged
    by -log10 of its smallest p-value (each ranked against its score's calib column) above the threshold
    that flags ``fpr`` of calib, exactly when some score ``j`` exceeds the ``j``-th value returned."""
    calib = np.asarray(calib, np.float64)
    neglog = np.stack([-np.log10(pvalues(c, c)) for c in calib.T], 1)  # (N, J)
    limit = threshold_at_fpr(neglog.max(1), fpr)
    # -log10 p is non-decreasing in the score: the largest calib score at or under the limit bounds it
    return tuple(
        float(c[n <= limit].max()) if (n <= limit).any() else -np.inf for c, n in zip(calib.T, neglog.T)
    )


def with_combined(scores: pd.DataFrame) -> pd.DataFrame:
    """The score table with ``m-combined`` rows after every conditional model ``m`` (one that has
    ``m-disagree`` rows; ``ardetect.conditional``)."""
    suffix = COMBINED[1]
    conditional = [m.removesuffix(suffix) for m in dict.fromkeys(scores["model"]) if m.endswith(suffix)]
    return pd.concat([scores, *(combined_rows(scores, m) for m in conditional)], ignore_index=True)


def _pct(x: float) -> str:
    return f"{100 * x:g}"


def _calibration(per_model: pd.DataFrame, model: str, fpr: float) -> tuple[float, pd.Series]:
    """The model's threshold at ``fpr`` on its ``calib`` rows, and its ``train_ref`` BPDs (p-values)."""
    calib = per_model.loc[per_model["source"] == "calib", "bpd"]
    ref = per_model.loc[per_model["source"] == "train_ref", "bpd"]
    for what, part in (("calib", calib), ("train_ref", ref)):
        if part.empty:
            raise ValueError(f"model {model!r} has no {what!r} rows; the detection table needs them")
    return threshold_at_fpr(calib, fpr), ref


def detection_table(
    scores: pd.DataFrame,
    fpr: float = 0.05,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """One row per model × attack set with AUROC [paired CI], TPR and realized FPR at the calibrated
    threshold, and p-value detection rates.

    Each model needs ``calib`` rows (the threshold: at most ``fpr`` of them above it) and ``train_ref``
    rows (p-values). Groups without a positive keep their row with ``n_pos = 0`` and NaN metrics.
    Columns: model, set, attack, epsilon, n_pos, n_neg, small (``n_pos < MIN_CELL``), auroc, ci_low,
    ci_high, ci_level, tpr_at_{100*fpr}fpr (e.g. ``tpr_at_5fpr``), fpr (the rate realized on this
    group's clean originals at that threshold), threshold, alpha, pvalue_detection_rate (positives
    with p < alpha), pvalue_fpr (clean originals with p < alpha), bpd_clean_mean, bpd_adv_mean.
    """
    df = validate_scores(scores)
    tpr_col = f"tpr_at_{_pct(fpr)}fpr"
    rows = []
    calibrations: dict[str, tuple[float, pd.Series]] = {}
    for g in detection_groups(df):
        if g.model not in calibrations:
            calibrations[g.model] = _calibration(df[df["model"] == g.model], g.model, fpr)
        threshold, ref = calibrations[g.model]
        row: dict[str, object] = {
            "model": g.model,
            "set": g.attack_set.slug,
            "attack": g.attack,
            "epsilon": g.epsilon,
            "n_pos": len(g.pos),
            "n_neg": len(g.neg),
            "small": len(g.pos) < MIN_CELL,
            "auroc": np.nan,
            "ci_low": np.nan,
            "ci_high": np.nan,
            "ci_level": level,
            tpr_col: np.nan,
            "fpr": np.nan,
            "threshold": threshold,
            "alpha": alpha,
            "pvalue_detection_rate": np.nan,
            "pvalue_fpr": np.nan,
            "bpd_clean_mean": np.nan,
            "bpd_adv_mean": np.nan,
        }
        if len(g.pos):
            low, high = bootstrap_auroc_ci(g.neg, g.pos, n_boot, seed, level, paired=True)
            row.update(
                auroc=roc(g.neg, g.pos).auroc,
                ci_low=low,
                ci_high=high,
                fpr=tpr_at_threshold(g.neg, threshold),
                pvalue_detection_rate=pvalue_detection_rate(g.pos, ref, alpha),
                pvalue_fpr=pvalue_detection_rate(g.neg, ref, alpha),
                bpd_clean_mean=float(g.neg.mean()),
                bpd_adv_mean=float(g.pos.mean()),
                **{tpr_col: tpr_at_threshold(g.pos, threshold)},
            )
        rows.append(row)
    return pd.DataFrame(rows)


def realized_fpr(scores: pd.DataFrame, fpr: float = 0.05) -> pd.DataFrame:
    """Per model: the calibrated threshold and the false-positive rate it realizes on every clean
    ``test`` row (disjoint from ``calib``), next to the target; columns model, n_calib, n_test,
    threshold, target_fpr, fpr."""
    df = validate_scores(scores)
    rows = []
    for model, per_model in df.groupby("model", sort=False):
        threshold, _ = _calibration(per_model, str(model), fpr)
        test = per_model.loc[per_model["source"] == "test", "bpd"]
        rows.append(
            {
                "model": model,
                "n_calib": int((per_model["source"] == "calib").sum()),
                "n_test": len(test),
                "threshold": threshold,
                "target_fpr": fpr,
                "fpr": tpr_at_threshold(test, threshold) if len(test) else np.nan,
            }
        )
    return pd.DataFrame(rows)


def attack_outcomes(
    scores: pd.DataFrame, model: str, sets: list[AttackSet], image_ids: ArrayLike, fpr: float = 0.05
) -> pd.DataFrame:
    """What each attack set achieves against ``model``'s detector on the same images (``image_ids``).

    Per set: ``n``; ``classifier_success`` (fooled after rounding); ``evasion_rate`` (among those, the
    fraction at or under the calibrated threshold, i.e. not flagged: 1 − ``tpr``); ``joint_success``
    (both: the attack's real goal against the defended system, ``classifier_success × evasion_rate``);
    and the detector on the successful ones against their clean originals: ``n_pos``, ``auroc``, ``tpr``
    (at the threshold). Comparing an adaptive set with its oblivious counterpart on the
    same originals shows what knowing the detector buys the attacker.
    """
    df = validate_scores(scores)
    per_model = df[df["model"] == model]
    threshold, _ = _calibration(per_model, model, fpr)
    ids = np.asarray(image_ids)
    adv = per_model[(per_model["source"] == "adversarial") & per_model["image_id"].isin(ids)]
    clean = per_model[per_model["source"] == "test"].set_index("image_id")["bpd"]
    rows = []
    for attack_set in sets:
        part = adv[(adv["attack"] == attack_set.attack) & _epsilon_is(adv["epsilon"], attack_set.epsilon)]
        success = part["success"].fillna(False).to_numpy(bool)
        bpd = part["bpd"].to_numpy(np.float64)
        evaded = bpd <= threshold
        pos, neg = bpd[success], clean.loc[part["image_id"][success]].to_numpy(np.float64)
        rows.append(
            {
                "set": attack_set.slug,
                "n": len(part),
                "classifier_success": success.mean() if len(part) else np.nan,
                "evasion_rate": evaded[success].mean() if success.any() else np.nan,
                "joint_success": (success & evaded).mean() if len(part) else np.nan,
                "n_pos": len(pos),
                "auroc": roc(neg, pos).auroc if len(pos) else np.nan,
                "tpr": tpr_at_threshold(pos, threshold) if len(pos) else np.nan,
                "threshold": threshold,
            }
        )
    return pd.DataFrame(rows)


def _epsilon_is(column: pd.Series, epsilon: float | None) -> pd.Series:
    values = column.astype(np.float64)
    return values.isna() if epsilon is None else np.isclose(values, epsilon, rtol=0, atol=1e-9)


def roc_points(scores: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model, every attack set's ROC curve as rows (fpr, tpr, curve = set slug, point = order along
    the curve): the table ``dvc plots`` draws with the project's ``roc`` template."""
    curves: dict[str, list[pd.DataFrame]] = {}
    for g in detection_groups(scores):
        if len(g.pos):
            c = roc(g.neg, g.pos)
            points = {"fpr": c.fpr, "tpr": c.tpr, "curve": g.attack_set.slug, "point": np.arange(len(c.fpr))}
            curves.setdefault(g.model, []).append(pd.DataFrame(points))
    return {model: pd.concat(frames, ignore_index=True) for model, frames in curves.items()}


def tpr_column(table: pd.DataFrame) -> str:
    """The detection table's TPR column (``tpr_at_<100 fpr>fpr``, named after the target FPR)."""
    return next(c for c in table.columns if c.startswith("tpr_at_"))


def detection_metrics(table: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """``detection.json``: model → set → AUROC, its interval, TPR and realized FPR at the calibrated
    threshold, p-value detection rate and the number of positives."""
    tpr_col = tpr_column(table)
    cols = ("auroc", "ci_low", "ci_high", tpr_col, "fpr", "pvalue_detection_rate", "n_pos")
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for _, row in table.iterrows():
        metrics.setdefault(str(row["model"]), {})[str(row["set"])] = {c: float(row[c]) for c in cols}
    return metrics


def headline_cells(table: pd.DataFrame, metrics: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """The tracking run's headline: AUROC, TPR at the target FPR and realized FPR per model and set
    (``<model>/<set>/<metric>``), for cells with positives."""
    tpr = tpr_column(table)
    logged = {"auroc": "auroc", tpr: "tpr_at_fpr", "fpr": "fpr"}
    return {f"{m}/{s}/{v}": c[k] for m, sets in metrics.items() for s, c in sets.items()
            for k, v in logged.items() if c["n_pos"] > 0}  # fmt: skip


def write_roc_points(scores: pd.DataFrame, folder: Path) -> None:
    """``folder/<model>.csv``: each model's ROC points (``dvc plots``' ``roc`` template)."""
    folder.mkdir()
    for model, points in roc_points(scores).items():
        points.to_csv(folder / f"{model}.csv", index=False)


# ------------------------------------------------------------------- verdicts on new images (the CLI)


@dataclasses.dataclass(frozen=True)
class Verdict:
    file: str
    model: str
    bpd: float
    bpd_se: float
    pvalue: float
    threshold: float
    fpr: float
    verdict: str  # adversarial | clean


def verdicts(
    files: Sequence[str],
    bpd: np.ndarray,
    se: np.ndarray,
    model: str,
    train_ref: np.ndarray,
    calib: np.ndarray,
    fpr: float,
) -> list[Verdict]:
    """P-values against ``train_ref`` and verdicts at the ``fpr`` threshold on ``calib`` (flag: bpd > t)."""
    threshold = threshold_at_fpr(calib, fpr)
    p = pvalues(bpd, train_ref)
    return [
        Verdict(
            f,
            model,
            float(b),
            float(s),
            float(q),
            threshold,
            fpr,
            "adversarial" if b > threshold else "clean",
        )
        for f, b, s, q in zip(files, bpd, se, p)
    ]


def verdict_table(rows: Sequence[Verdict]) -> str:
    """The verdicts as an aligned text table (file, bpd, ±se, p-value, threshold, verdict)."""
    table = pd.DataFrame([dataclasses.asdict(r) for r in rows])
    table = table[["file", "bpd", "bpd_se", "pvalue", "threshold", "verdict"]]
    table.columns = pd.Index(["file", "bpd", "±se", "p-value", "threshold", "verdict"])
    return table.to_string(index=False, float_format="{:.4f}".format, justify="left")


# ------------------------------------------------------------------ detection.json read back (the CLI)


def auroc_pivot(
    detection: Mapping[str, Mapping[str, Mapping[str, float]]],
    model_order: Sequence[str] = (),
    set_order: Sequence[str] = (),
) -> pd.DataFrame:
    """AUROC of ``detection.json`` (model → set → metrics): one row per model, one column per set, in
    ``model_order`` / ``set_order`` where given (other names after them, in file order)."""
    long = pd.DataFrame(
        [
            {"model": m, "set": s, "auroc": v.get("auroc", np.nan)}
            for m, sets in detection.items()
            for s, v in sets.items()
        ],
        columns=["model", "set", "auroc"],
    )

    def order(preferred: Sequence[str], found: pd.Series) -> list[str]:
        names = list(dict.fromkeys(found))
        return [n for n in preferred if n in names] + [n for n in names if n not in preferred]

    table = long.pivot(index="model", columns="set", values="auroc")
    table = table.reindex(index=order(model_order, long["model"]), columns=order(set_order, long["set"]))
    table.index.name = table.columns.name = None
    return table


def small_sets(detection: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, int]:
    """Sets with fewer than MIN_CELL positives under some model (its smallest n), as report.md flags them."""
    n: dict[str, int] = {}
    for sets in detection.values():
        for name, v in sets.items():
            n[name] = min(n.get(name, 2**31), int(v.get("n_pos", 0)))
    return {k: v for k, v in n.items() if v < MIN_CELL}
