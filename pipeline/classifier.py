"""DVC stage `classifier`: a CNN on the gray-level training images, early-stopped on validation accuracy."""

from __future__ import annotations

import dataclasses

import pandas as pd

from ardetect import layout
from ardetect.classifier import (
    ClassifierConfig,
    ClassifierParams,
    accuracy,
    save_classifier,
    train_classifier,
)
from ardetect.configs import config_dataclass, load_sections, narrow
from ardetect.data import load_split
from ardetect.devices import resolve_device
from ardetect.io import staged_outputs, write_json
from ardetect.tracking import TrackingParams, run_stage, stage_run

OUTS = layout.CLASSIFIER_DIR, layout.CLASSIFIER_METRICS, layout.CLASSIFIER_PLOT


@config_dataclass
class StageParams:
    classifier: ClassifierParams = dataclasses.field(default_factory=ClassifierParams)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)


def main() -> None:
    params = load_sections(StageParams)
    p = params.classifier
    device = resolve_device(p.device, "classifier.device")
    train, val, test = (load_split(layout.split_path(s)) for s in ("train", "val", "test"))
    inputs = [layout.DATASET]
    with stage_run("classifier", params.tracking, params=dataclasses.asdict(p), inputs=inputs) as run:
        log = lambda r: run.log_metrics(r, step=int(r["epoch"]))  # noqa: E731
        model, history = train_classifier(train["images"], train["labels"], val["images"], val["labels"],
                                          narrow(p, ClassifierConfig), device=device, on_epoch=log,
                                          progress=p.progress)  # fmt: skip
        metrics = {
            "test_accuracy": accuracy(model, test["images"], test["labels"]),
            "val_accuracy": max(h["val_accuracy"] for h in history),
            "epochs_run": len(history),
        }
        with staged_outputs(*OUTS) as (model_dir, metrics_path, plot_path):
            model_dir.mkdir()
            save_classifier(model, model_dir / layout.CLASSIFIER.name, metrics=metrics)
            pd.DataFrame(history).to_csv(plot_path, index=False)
            run.log_headline(metrics, prefix="classifier")
            if params.tracking.log_models:
                run.log_torch_model(model.cpu())
            write_json(metrics_path, metrics)
        print(f"classifier: test accuracy {metrics['test_accuracy']:.2%} on {len(test['labels'])} images")


if __name__ == "__main__":
    run_stage(main)
