"""DVC stage `report`: data/report/report.md from every evaluation stage's outputs, and the compact
headline metrics (data/metrics/headline: one file per density model, the same keys in each, so
`dvc metrics show` prints one readable row per model)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from ardetect import ood
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import BinarizeParams, DataParams
from ardetect.detection import DetectParams
from ardetect.io import staged_outputs, write_json
from ardetect.report import DetectOutputs, evaluation_notes, headline_metrics, publish_report
from ardetect.scoring import ScoreParams
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import ModelEntry, TrainSection, detector_models

DETECT, TRAIN_METRICS = Path("data/detect"), Path("data/metrics/train")
CLASSIFIER_METRICS, ATTACK_SUMMARY = Path("data/metrics/classifier.json"), Path("data/attacks/summary.csv")
ADAPTIVE_SWEEP, OOD_FIGURE = Path("data/adaptive/sweep.png"), Path("data/ood/ood_bpd.png")
OOD_METRICS = Path("data/metrics/ood.json")
OUTS = Path("data/report"), Path("data/metrics/headline")


@config_dataclass
class StageParams:
    data: DataParams = dataclasses.field(default_factory=DataParams)
    binarize: BinarizeParams = dataclasses.field(default_factory=BinarizeParams)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    score: ScoreParams = dataclasses.field(default_factory=ScoreParams)
    detect: DetectParams = dataclasses.field(default_factory=DetectParams)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)


def main() -> None:
    params = load_sections(StageParams)
    detect = DetectOutputs.read(DETECT)
    detectors = detector_models(params.train, params.models)
    train = {m: json.loads((TRAIN_METRICS / f"{m}.json").read_text()) for m in detectors}
    ood_metrics = json.loads(OOD_METRICS.read_text())
    with stage_run("report", params.tracking, params={}, inputs=[DETECT, TRAIN_METRICS]) as run:
        with staged_outputs(*OUTS) as (out, headline_dir):
            out.mkdir()
            headline_dir.mkdir()
            p = params
            notes = evaluation_notes(
                p.data.dataset, p.binarize.mode, p.detect.fpr, p.score.num_calib, p.score.num_train_ref
            )
            extra_figures = {
                "Adaptive PGD strength sweep: BPD of the iterate per step": ADAPTIVE_SWEEP,
                "Out-of-distribution sets: BPD histograms per model": OOD_FIGURE,
            }
            publish_report(
                out,
                detect,
                classifier=json.loads(CLASSIFIER_METRICS.read_text()),
                attacks=pd.read_csv(ATTACK_SUMMARY),
                notes=notes,
                sections=[ood.markdown_section(ood_metrics)],
                figures=extra_figures,
            )
            headline = headline_metrics(train, detect.detection, ood.headline(ood_metrics))
            for model, row in headline.items():
                write_json(headline_dir / f"{model}.json", row)
            run.log_headline(
                {f"{m}/{k}": v for m, r in headline.items() for k, v in r.items()}, prefix="headline"
            )
            if detect.adaptive is not None:
                cols = ("classifier_success", "evasion_rate", "joint_success", "auroc")
                rows = detect.adaptive.set_index(["model", "set"])[list(cols)]
                run.log_headline({f"{m}/{s}/{c}": v for (m, s), r in rows.iterrows() for c, v in r.items()},
                                 prefix="adaptive_vs_oblivious")  # fmt: skip
            for f in out.iterdir():
                run.log_artifact(f, "report")
    print(f"wrote {OUTS[0] / 'report.md'}")


if __name__ == "__main__":
    run_stage(main)
