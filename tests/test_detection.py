"""Detection metrics on toy cases with known answers, the score-table schema, and the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from ardetect.detection import (
    COLUMNS,
    _auroc_rows,
    bootstrap_auroc_ci,
    detection_table,
    pvalue_detection_rate,
    pvalues,
    roc,
    threshold_at_fpr,
    tpr_at_threshold,
    with_pvalues,
)
from ardetect.report import (
    bpd_density_figure,
    pvalue_histogram_figure,
    roc_figure,
    save_figure,
    write_report,
)


def test_roc_sign_convention_on_toy_case() -> None:
    """Pairs (pos > neg): 1.5 beats 0 and 1; 3 and 4 beat all three: AUROC = 8/9."""
    neg, pos = [0.0, 1.0, 2.0], [1.5, 3.0, 4.0]
    assert roc(neg, pos).auroc == pytest.approx(8 / 9)
    assert roc(pos, neg).auroc == pytest.approx(1 / 9)
    curve = roc(neg, pos)
    assert curve.fpr[0] == 0 and curve.tpr[-1] == 1


def test_higher_bpd_adversarials_give_auroc_above_half() -> None:
    rng = np.random.default_rng(0)
    clean, adv = rng.normal(3.0, 0.5, 500), rng.normal(3.5, 0.5, 500)
    assert roc(clean, adv).auroc > 0.7


def test_vectorised_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(1)
    neg, pos = rng.integers(0, 5, (4, 30)).astype(float), rng.integers(1, 6, (4, 20)).astype(float)
    for r in range(4):
        y = np.r_[np.zeros(30), np.ones(20)]
        assert _auroc_rows(neg[r : r + 1], pos[r : r + 1])[0] == pytest.approx(
            roc_auc_score(y, np.r_[neg[r], pos[r]])
        )


def test_bootstrap_ci_contains_estimate_and_narrows() -> None:
    rng = np.random.default_rng(2)
    widths = []
    for n in (40, 2000):
        neg, pos = rng.normal(0, 1, n), rng.normal(0.8, 1, n)
        low, high = bootstrap_auroc_ci(neg, pos, n_boot=500, seed=0)
        assert low < roc(neg, pos).auroc < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # width ~ 1/sqrt(n): about 7x narrower
    assert bootstrap_auroc_ci([0, 1], [2, 3], n_boot=50) == (1.0, 1.0)


def test_threshold_at_5pct_fpr_generalises() -> None:
    rng = np.random.default_rng(3)
    val = rng.normal(2.0, 0.3, 20_000)
    t = threshold_at_fpr(val, 0.05)
    assert (val > t).mean() <= 0.05
    fresh = rng.normal(2.0, 0.3, 200_000)
    assert tpr_at_threshold(fresh, t) == pytest.approx(0.05, abs=0.004)
    assert tpr_at_threshold([t, t + 1e-9], t) == 0.5  # flagged means strictly above


def test_pvalues_on_toy_case() -> None:
    """p = (1 + #{ref >= s}) / (n_ref + 1) with ref = [1, 2, 3, 4]."""
    np.testing.assert_allclose(pvalues([0, 2, 2.5, 5], [4, 1, 3, 2]), [5 / 5, 4 / 5, 3 / 5, 1 / 5])
    ref = np.arange(100.0)
    # 99.5: no ref >= -> 1/101; 96: 4 ref >= -> 5/101 < .05; 95: 6/101 > .05; 0: 1
    assert pvalue_detection_rate([99.5, 96, 95, 0], ref, alpha=0.05) == 0.5


def make_scores(seed: int = 0) -> pd.DataFrame:
    """Two models; adversarial BPD = clean + shift; failed attacks get a very low BPD that must be ignored;
    test images 150.. are never successfully attacked and have huge clean BPD that must not be negatives.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for model, shift in (("fvsbn", 0.5), ("made", 2.0)):
        for source, n in (("train_ref", 1000), ("calib", 500)):
            rows += [
                dict(
                    image_id=i + (1000 if source == "calib" else 0),
                    source=source,
                    attack=None,
                    epsilon=np.nan,
                    model=model,
                    bpd=rng.normal(1.0, 0.2),
                    bpd_se=0.0,
                    label=0,
                    prediction=0,
                    success=np.nan,
                )
                for i in range(n)
            ]
        clean = rng.normal(1.0, 0.2, 200)
        clean[150:] += 50
        rows += [
            dict(
                image_id=i,
                source="test",
                attack=None,
                epsilon=np.nan,
                model=model,
                bpd=clean[i],
                bpd_se=0.0,
                label=1,
                prediction=1,
                success=np.nan,
            )
            for i in range(200)
        ]
        for attack, eps, n_ok in (("fgsm", 0.1, 150), ("cw", np.nan, 100), ("noise", 0.1, 0)):
            for i in range(200):
                ok = i < n_ok
                rows.append(
                    dict(
                        image_id=i,
                        source="adversarial",
                        attack=attack,
                        epsilon=eps,
                        model=model,
                        bpd=clean[i] + shift if ok else -100.0,
                        bpd_se=0.01,
                        label=1,
                        prediction=2 if ok else 1,
                        success=ok,
                    )
                )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_detection_table_pairs_successes_with_their_originals() -> None:
    scores = make_scores()
    table = detection_table(scores, n_boot=200)
    assert len(table) == 2 * 3
    row = table[(table["model"] == "made") & (table["attack"] == "fgsm")].iloc[0]
    test = scores[(scores["model"] == "made") & (scores["source"] == "test")].set_index("image_id")["bpd"]
    assert row["n_pos"] == row["n_neg"] == 150
    assert row["bpd_clean_mean"] == pytest.approx(test.loc[:149].mean())
    assert row["bpd_adv_mean"] == pytest.approx(test.loc[:149].mean() + 2.0)
    assert row["auroc"] > 0.99
    assert row["ci_low"] <= row["auroc"] <= row["ci_high"]
    assert row["tpr_at_5fpr"] > 0.95 and row["pvalue_detection_rate"] > 0.95
    calib = scores[(scores["model"] == "made") & (scores["source"] == "calib")]["bpd"]
    assert row["threshold"] == pytest.approx(threshold_at_fpr(calib, 0.05))
    assert row["fpr"] == pytest.approx((test.loc[:149] > row["threshold"]).mean())
    weak = table[(table["model"] == "fvsbn") & (table["attack"] == "fgsm")].iloc[0]
    assert 0.5 < weak["auroc"] < row["auroc"]
    cw = table[(table["model"] == "made") & (table["attack"] == "cw")].iloc[0]
    assert np.isnan(cw["epsilon"]) and cw["n_pos"] == 100
    noise = table[(table["model"] == "made") & (table["attack"] == "noise")].iloc[0]
    assert noise["n_pos"] == 200, "a control is scored on every image, not filtered by success"
    assert noise["auroc"] < 0.01  # the toy's noise images have BPD -100


def test_schema_errors_are_clear() -> None:
    scores = make_scores()
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['bpd_se'\]"):
        detection_table(scores.drop(columns="bpd_se"))
    bad = scores.copy()
    bad.loc[0, "source"] = "training"
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['training'\]"):
        detection_table(bad)
    orphan = scores[~((scores["source"] == "test") & (scores["image_id"] == 3))]
    with pytest.raises(ValueError, match="without a clean 'test' row"):
        detection_table(orphan)
    with pytest.raises(ValueError, match="no 'calib' rows"):
        detection_table(scores[scores["source"] != "calib"])
    nan_bpd = scores.copy()
    nan_bpd.loc[5, "bpd"] = np.nan
    with pytest.raises(ValueError, match="bpd is missing"):
        detection_table(nan_bpd)


def test_report_figures_and_markdown(tmp_path: Path) -> None:
    scores = make_scores()
    table = detection_table(scores, n_boot=100)
    roc_fig = roc_figure(scores)
    assert isinstance(roc_fig, Figure) and len(roc_fig.axes) == 2
    assert len(roc_fig.axes[0].get_lines()) == 1 + 3  # chance + noise + fgsm + cw
    hist_fig = bpd_density_figure(scores)
    assert len(hist_fig.axes) == 2  # one panel per model
    assert [t.get_text() for t in hist_fig.axes[0].get_legend().get_texts()][:2] == [
        "clean originals",
        "noise ε=0.1 (n=200)",
    ]
    assert hist_fig.axes[0].get_xlabel() == "bits per dimension"
    relabelled = scores.assign(
        model=scores["model"] + np.where(scores["model"] == "made", "-combined", "-disagree")
    )
    panels = {ax.get_title(): ax for ax in bpd_density_figure(relabelled).axes}
    assert {title: ax.get_xlabel() for title, ax in panels.items()} == {
        "made-combined": "-log10 of the smaller calibrated p-value",
        "fvsbn-disagree": "log10 disagreement, bits/dim (≥ 1e-05)",
    }
    # the disagreement is drawn in log10 (floored), its threshold too; other scores as they are
    rows = (relabelled["model"] == "fvsbn-disagree") & (relabelled["source"] == "calib")
    calib = relabelled.loc[rows, "bpd"]
    tau = threshold_at_fpr(calib, 0.05)
    (threshold,) = [ln for ln in panels["fvsbn-disagree"].get_lines() if ln.get_linestyle() == "--"]
    assert threshold.get_xdata()[0] == pytest.approx(np.log10(max(tau, 1e-5)))
    floored = relabelled.assign(bpd=np.where(relabelled["model"] == "fvsbn-disagree", 0.0, relabelled["bpd"]))
    (floor_panel,) = [ax for ax in bpd_density_figure(floored).axes if ax.get_title() == "fvsbn-disagree"]
    rugs = [ln for ln in floor_panel.get_lines() if ln.get_marker() == "|"]
    assert rugs and all(np.all(ln.get_xdata() == -5.0) for ln in rugs), "all zeros: a rug at the floor"
    attacked = floored.loc[floored["source"] == "adversarial", "image_id"].nunique()
    assert len(rugs[0].get_xdata()) == attacked, "each clean original once, equal scores not merged"
    p_fig = pvalue_histogram_figure(scores)
    pv = with_pvalues(scores)
    assert pv["pvalue"].between(0, 1).all()
    figures = {}
    for name, fig in (("ROC", roc_fig), ("BPD", hist_fig), ("p-values", p_fig)):
        path = save_figure(fig, tmp_path / "figures" / f"{name}.png")
        assert path.stat().st_size > 1000
        figures[name] = path
    classifier = pd.DataFrame({"split": ["test"], "accuracy": [0.9123]})
    attacks = pd.DataFrame(
        {
            "attack": ["fgsm"],
            "epsilon": [0.1],
            "success_before_rounding": [0.81],
            "success_after_rounding": [0.79],
        }
    )
    report = write_report(
        tmp_path / "out" / "report.md",
        classifier=classifier,
        attacks=attacks,
        detection=table,
        figures=figures,
    )
    text = report.read_text()
    assert "0.912" in text and "0.790" in text
    made_fgsm = table[(table["model"] == "made") & (table["attack"] == "fgsm")].iloc[0]
    assert f"{made_fgsm['auroc']:.3f} [{made_fgsm['ci_low']:.3f}, {made_fgsm['ci_high']:.3f}]" in text
    assert "AUROC [95% CI]" in text and "TPR@5%FPR" in text and "p<0.05 adv" in text
    assert "![ROC](../figures/ROC.png)" in text
    assert (report.parent / "../figures/ROC.png").exists()
