"""DVC stage `detect`: how well BPD separates successful adversarial images (positives) from their clean
originals, per model × attack set: ROC, AUROC with a paired bootstrap interval, TPR and realized FPR at
the calibrated threshold, p-value detection rate (``ardetect.detection``); report.md: stage `report`."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd

from ardetect import detection, layout
from ardetect.configs import config_dataclass, load_sections
from ardetect.io import staged_outputs, write_json
from ardetect.report import adaptive_comparison, auroc_matrix, save_detection_figures
from ardetect.tracking import TrackingParams, run_stage, stage_run

OUTS = layout.DETECT, layout.DETECTION_METRICS, layout.ROC_PLOTS


@config_dataclass
class StageParams:
    detect: detection.DetectParams = dataclasses.field(default_factory=detection.DetectParams)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)


def main() -> None:
    params = load_sections(StageParams)
    p = params.detect
    scores = detection.with_combined(pd.read_parquet(layout.SCORES))  # + conditional models' union
    with stage_run("detect", params.tracking, params=dataclasses.asdict(p), inputs=[layout.SCORES]) as run:
        table = detection.detection_table(
            scores, fpr=p.fpr, alpha=p.alpha, n_boot=p.n_boot, seed=p.seed, level=p.level
        )
        meta = json.loads(layout.ADAPTIVE_METRICS.read_text()) if layout.ADAPTIVE_METRICS.is_file() else {}
        adaptive, adaptive_notes = adaptive_comparison(scores, meta, p.fpr)
        metrics = detection.detection_metrics(table)
        with staged_outputs(*OUTS) as (out, metrics_path, roc_dir):
            out.mkdir()
            detection.write_roc_points(scores, roc_dir)
            save_detection_figures(scores, p.fpr, out)
            table.to_csv(out / "detection.csv", index=False)
            detection.realized_fpr(scores, p.fpr).to_csv(out / "fpr.csv", index=False)
            if adaptive is not None:
                adaptive.to_csv(out / "adaptive.csv", index=False)
                (out / "adaptive.md").write_text(adaptive_notes)
            run.log_headline(detection.headline_cells(table, metrics), prefix="detect")
            for f in out.iterdir():
                run.log_artifact(f, "detect")
            write_json(metrics_path, metrics)
        print(auroc_matrix(table).to_string(index=False))


if __name__ == "__main__":
    run_stage(main)
