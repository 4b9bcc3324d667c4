"""DVC stage `report`: data/report/report.md from every evaluation stage's outputs, and the headline
metrics (data/metrics/headline: one file per model, the same keys: a row each in `dvc metrics show`)."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd

from ardetect import compression, layout, ood, purify, report
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import BinarizeParams, DataParams
from ardetect.detection import DetectParams
from ardetect.io import staged_outputs
from ardetect.scoring import ScoreParams
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import ModelEntry, TrainSection, detector_models


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
    p = load_sections(StageParams)
    detect = report.DetectOutputs.read(layout.DETECT)
    train = {m: json.loads(layout.train_metrics(m).read_text()) for m in detector_models(p.train, p.models)}
    stages = (layout.OOD_METRICS, layout.COMPRESS_METRICS, layout.PURIFY_METRICS)
    read = [json.loads(f.read_text()) for f in stages]
    sections = [report.conditional_section(train, detect.detection)]
    sections += [module.markdown_section(m) for module, m in zip((ood, compression, purify), read)]
    purified = {f"Purification, {f.stem}": f for f in sorted(layout.PURIFY.glob("*.png"))}
    figures = report.STAGE_FIGURES | purified
    notes = report.evaluation_notes(p.data.dataset, p.binarize.mode, p.detect.fpr, p.score.num_calib,
                                    p.score.num_train_ref)  # fmt: skip
    with stage_run("report", p.tracking, params={}, inputs=[layout.DETECT, layout.TRAIN_METRICS]) as run:
        with staged_outputs(layout.REPORT, layout.HEADLINE) as (out, headline_dir):
            out.mkdir()
            report.publish_report(out, detect, classifier=json.loads(layout.CLASSIFIER_METRICS.read_text()),
                                  attacks=pd.read_csv(layout.ATTACK_SUMMARY), notes=notes, sections=sections,
                                  figures=figures)  # fmt: skip
            headline = report.headline_metrics(train, detect.detection, ood.headline(read[0]))
            run.log_headline(report.write_headline(headline_dir, headline), prefix="headline")
            if cells := report.adaptive_cells(detect.adaptive):
                run.log_headline(cells, prefix="adaptive_vs_oblivious")
            for f in out.iterdir():
                run.log_artifact(f, "report")
    print(f"wrote {layout.REPORT / 'report.md'}")


if __name__ == "__main__":
    run_stage(main)
