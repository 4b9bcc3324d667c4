"""DVC stage `detect`: how well BPD separates successful adversarial images from their clean originals.

Positive = adversarial (successful after 8-bit rounding; every image of the noise control), negative =
its clean original, score = BPD (higher is more suspicious). Per model × attack set: ROC and AUROC with a
paired bootstrap interval, TPR and realized FPR at the threshold calibrated on clean test-pool images,
PixelDefend p-value detection rate; the adaptive sets next to their oblivious counterparts. The tables
and figures go to data/detect; the `report` stage turns them into report.md.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from ardetect.configs import config_dataclass, load_sections
from ardetect.detection import DetectParams, detection_metrics, detection_table, realized_fpr, roc_points
from ardetect.io import staged_outputs, write_json
from ardetect.report import adaptive_comparison, auroc_matrix, save_detection_figures
from ardetect.tracking import TrackingParams, run_stage, stage_run

SCORES = Path("data/scores/scores.parquet")
ADAPTIVE_METRICS = Path("data/metrics/adaptive.json")
OUTS = Path("data/detect"), Path("data/metrics/detection.json"), Path("data/plots/roc")


@config_dataclass
class StageParams:
    detect: DetectParams = dataclasses.field(default_factory=DetectParams)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)


def main() -> None:
    params = load_sections(StageParams)
    p = params.detect
    scores = pd.read_parquet(SCORES)
    with stage_run("detect", params.tracking, params=dataclasses.asdict(p), inputs=[SCORES]) as run:
        table = detection_table(scores, fpr=p.fpr, alpha=p.alpha, n_boot=p.n_boot, seed=p.seed, level=p.level)
        meta = json.loads(ADAPTIVE_METRICS.read_text()) if ADAPTIVE_METRICS.is_file() else {}
        adaptive, adaptive_notes = adaptive_comparison(scores, meta, p.fpr)
        metrics = detection_metrics(table)
        with staged_outputs(*OUTS) as (out, metrics_path, roc_dir):
            out.mkdir()
            roc_dir.mkdir()
            for model, points in roc_points(scores).items():
                points.to_csv(roc_dir / f"{model}.csv", index=False)
            save_detection_figures(scores, p.fpr, out)
            table.to_csv(out / "detection.csv", index=False)
            realized_fpr(scores, p.fpr).to_csv(out / "fpr.csv", index=False)
            if adaptive is not None:
                adaptive.to_csv(out / "adaptive.csv", index=False)
                (out / "adaptive.md").write_text(adaptive_notes)
            tpr = next(c for c in table.columns if c.startswith("tpr_at_"))
            logged = {"auroc": "auroc", tpr: "tpr_at_fpr", "fpr": "fpr"}
            cells = {f"{m}/{s}/{v}": c[k] for m, sets in metrics.items() for s, c in sets.items()
                     for k, v in logged.items() if c["n_pos"] > 0}  # fmt: skip
            run.log_headline(cells, prefix="detect")
            for f in out.iterdir():
                run.log_artifact(f, "detect")
            write_json(metrics_path, metrics)
        print(auroc_matrix(table).to_string(index=False))


if __name__ == "__main__":
    run_stage(main)
