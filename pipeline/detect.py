"""DVC stage `detect`: how well BPD separates successful adversarial images from their clean originals.

Positive = adversarial (successful after 8-bit rounding; every image of the noise control), negative =
its clean original, score = BPD (higher is more suspicious). Per model × attack set: ROC and AUROC with a
paired bootstrap interval, TPR and realized FPR at the threshold calibrated on clean test-pool images,
PixelDefend p-value detection rate; the adaptive sets next to their oblivious counterparts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ardetect.configs import config_dataclass, load_sections
from ardetect.data import BinarizeParams, DataParams
from ardetect.detection import DetectParams, detection_groups, detection_table, realized_fpr, roc
from ardetect.io import staged_outputs, write_json
from ardetect.report import (
    adaptive_comparison,
    auroc_matrix,
    bpd_density_figure,
    pvalue_histogram_figure,
    roc_figure,
    save_figure,
    write_report,
)
from ardetect.scoring import ScoreParams
from ardetect.tracking import TrackingParams, stage_run

SCORES = Path("data/scores/scores.parquet")
ATTACK_SUMMARY = Path("data/attacks/summary.csv")
CLASSIFIER_METRICS = Path("data/metrics/classifier.json")
ADAPTIVE_METRICS, ADAPTIVE_SWEEP = Path("data/metrics/adaptive.json"), Path("data/adaptive/sweep.png")
OUTS = Path("data/report"), Path("data/metrics/detection.json"), Path("data/plots/roc")


@config_dataclass
class StageParams:
    detect: DetectParams = dataclasses.field(default_factory=DetectParams)
    data: DataParams = dataclasses.field(default_factory=DataParams)
    binarize: BinarizeParams = dataclasses.field(default_factory=BinarizeParams)
    score: ScoreParams = dataclasses.field(default_factory=ScoreParams)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)


def main() -> None:
    params = load_sections(StageParams)
    p = params.detect
    scores = pd.read_parquet(SCORES)
    with stage_run("detect", params.tracking, params=dataclasses.asdict(p), inputs=[SCORES]) as run:
        table = detection_table(scores, fpr=p.fpr, alpha=p.alpha, n_boot=p.n_boot, seed=p.seed, level=p.level)
        tpr_col = next(c for c in table.columns if c.startswith("tpr_at_"))
        metrics: dict[str, dict[str, dict[str, float]]] = {}
        for _, row in table.iterrows():
            cols = ("auroc", "ci_low", "ci_high", tpr_col, "fpr", "pvalue_detection_rate", "n_pos")
            metrics.setdefault(row["model"], {})[row["set"]] = {c: float(row[c]) for c in cols}
        fpr_table = realized_fpr(scores, p.fpr)
        meta = json.loads(ADAPTIVE_METRICS.read_text()) if ADAPTIVE_METRICS.is_file() else {}
        adaptive, adaptive_notes = adaptive_comparison(scores, meta, p.fpr)
        classifier = json.loads(CLASSIFIER_METRICS.read_text())
        with staged_outputs(*OUTS) as (report_dir, metrics_path, roc_dir):
            report_dir.mkdir()
            roc_dir.mkdir()
            curves: dict[str, list[pd.DataFrame]] = {}
            for g in detection_groups(scores):
                if len(g.pos):
                    c = roc(g.neg, g.pos)
                    curves.setdefault(g.model, []).append(
                        pd.DataFrame(
                            {
                                "fpr": c.fpr,
                                "tpr": c.tpr,
                                "curve": g.attack_set.slug,
                                "point": np.arange(len(c.fpr)),
                            }
                        )
                    )
            for model, frames in curves.items():
                pd.concat(frames).to_csv(roc_dir / f"{model}.csv", index=False)
            figures = {
                "ROC curves (successful adversarials vs their clean originals)": save_figure(
                    roc_figure(scores), report_dir / "roc.png"
                ),
                "BPD densities: clean originals and each attack family (smallest ε)": save_figure(
                    bpd_density_figure(scores, p.fpr), report_dir / "bpd_densities.png"
                ),
                "PixelDefend p-values": save_figure(
                    pvalue_histogram_figure(scores), report_dir / "pvalues.png"
                ),
            }
            if ADAPTIVE_SWEEP.is_file():
                figures["Adaptive PGD strength sweep: BPD of the iterate per step"] = ADAPTIVE_SWEEP
            table.to_csv(report_dir / "detection.csv", index=False)
            write_report(
                report_dir / "report.md",
                classifier=pd.DataFrame([{"metric": k, "value": v} for k, v in classifier.items()]),
                attacks=pd.read_csv(ATTACK_SUMMARY) if ATTACK_SUMMARY.is_file() else None,
                detection=table,
                adaptive=adaptive,
                adaptive_notes=adaptive_notes,
                fpr=fpr_table,
                figures=figures,
                notes=(
                    f"Dataset `{params.data.dataset}`, binarisation `{params.binarize.mode}`. Positive = "
                    "adversarial image that still fools the classifier after rounding to 8 bits; negative = "
                    "its clean original; score = BPD (higher = more suspicious). Threshold at "
                    f"{p.fpr:.0%} FPR on {params.score.num_calib} clean calibration images from the test "
                    "pool, disjoint from the evaluated ones; p-values against "
                    f"{params.score.num_train_ref} training images per model."
                ),
            )
            for model, sets in metrics.items():
                for name, m in sets.items():
                    if np.isfinite(m["auroc"]):
                        run.log_headline(
                            {"auroc": m["auroc"], "tpr_at_fpr": m[tpr_col], "fpr": m["fpr"]},
                            prefix=f"detect/{model}/{name}",
                        )
            if adaptive is not None:
                for _, r in adaptive.iterrows():
                    run.log_headline(
                        {
                            k: float(r[k])
                            for k in ("classifier_success", "evasion_rate", "joint_success", "auroc")
                        },
                        prefix=f"adaptive_vs_oblivious/{r['model']}/{r['set']}",
                    )
            for f in report_dir.iterdir():
                run.log_artifact(f, "report")
            write_json(metrics_path, metrics)
        print(auroc_matrix(table).to_string(index=False))


if __name__ == "__main__":
    main()
