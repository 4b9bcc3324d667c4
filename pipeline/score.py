"""DVC stage `score`: BPD of clean and adversarial images (``scoring.images_to_score``) under every
trained density model (binary models by the training data's binarisation, 8-bit models exactly); under
torchrun each rank scores a share of the batches, and rank 0 alone logs to MLflow, writes and prints."""

from __future__ import annotations

import dataclasses

from ardetect import layout
from ardetect.classifier import load_classifier, predict
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import BinarizeParams, load_split
from ardetect.devices import resolve_device
from ardetect.distributed import on_lead, process_group
from ardetect.io import staged_outputs, write_json
from ardetect.models import trained_model_paths
from ardetect.scoring import ScoreParams, images_to_score, load_scorers, score_metrics, score_table
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import ModelEntry, TrainSection, detector_models

INPUTS = [layout.DATASET, layout.ATTACKS, layout.ADAPTIVE, layout.MODELS]


@config_dataclass
class StageParams:
    score: ScoreParams = dataclasses.field(default_factory=ScoreParams)
    binarize: BinarizeParams = dataclasses.field(default_factory=BinarizeParams)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)


def main() -> None:
    params = load_sections(StageParams)
    p = params.score
    device = resolve_device(p.device, "score.device")
    detectors = detector_models(params.train, params.models)  # background models detect nothing
    model_paths = trained_model_paths(layout.MODELS, detectors)  # fails first, naming what is missing
    train, test = (load_split(layout.split_path(s)) for s in ("train", "test"))
    clf = load_classifier(layout.CLASSIFIER, device)
    sets = images_to_score(train, test, lambda x: predict(clf, x), layout.attack_files(), p)
    models = load_scorers(model_paths, params.binarize.mode)
    with on_lead(stage_run("score", params.tracking, params=dataclasses.asdict(p), inputs=INPUTS)) as run:
        table, speed = score_table(models, sets, p, device, p.progress, params.binarize.threshold)
        if run is None:  # another rank than 0: it scored its share, rank 0 has the whole table
            return
        metrics = score_metrics(table, speed)
        with staged_outputs(layout.SCORES_DIR, layout.SCORE_METRICS) as (out, metrics_path):
            out.mkdir()
            table.to_parquet(out / layout.SCORES.name, index=False)
            for name, m in metrics.items():
                run.log_headline(m, prefix=f"score/{name}")
            write_json(metrics_path, metrics)
        rates = ", ".join(f"{n} {s:.0f} img/s" for n, s in speed.items())
        print(f"scored {len(table)} (model, image) pairs: {rates}")


if __name__ == "__main__":
    with process_group():  # one process, or a rank of torchrun's (before any CUDA work)
        run_stage(main)
