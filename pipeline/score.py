"""DVC stage `score`: BPD of clean and adversarial images under every trained density model.

Binary models score gray images by their training data's binarisation (static: the thresholded image;
dynamic: the expected BPD over seeded Bernoulli draws, with its Monte-Carlo standard error); 8-bit
models score the (8-bit rounded) image exactly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ardetect.classifier import load_classifier, predict
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import BinarizeParams, load_split
from ardetect.devices import resolve_device
from ardetect.io import staged_outputs, write_json
from ardetect.models import load_model, trained_model_paths
from ardetect.scoring import ImageSet, ScoreParams, clean_test_pools, score_table
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import ModelEntry, TrainSection, detector_models

DATA, ATTACKS, ADAPTIVE, MODELS = (Path(f"data/{d}") for d in ("dataset", "attacks", "adaptive", "models"))
CLASSIFIER = Path("data/classifier/model.pt")
OUTS = Path("data/scores"), Path("data/metrics/score.json")


@config_dataclass
class StageParams:
    score: ScoreParams = dataclasses.field(default_factory=ScoreParams)
    binarize: BinarizeParams = dataclasses.field(default_factory=BinarizeParams)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)


def clean_set(source: str, split: dict[str, np.ndarray], index: np.ndarray, clf: object) -> ImageSet:
    images = split["images"][index]
    return ImageSet(source, images, index, split["labels"][index], predict(clf, images))  # type: ignore[arg-type]


def main() -> None:
    params = load_sections(StageParams)
    p = params.score
    device = resolve_device(p.device, "score.device")
    detectors = detector_models(params.train, params.models)  # background models detect nothing
    model_paths = trained_model_paths(MODELS, detectors)  # fails first, naming what is missing
    splits = {s: load_split(DATA / f"{s}.npz") for s in ("train", "test")}
    clf = load_classifier(CLASSIFIER, device)
    adv_files = sorted(ATTACKS.glob("*.npz")) + sorted(ADAPTIVE.glob("*.npz"))
    attacked: np.ndarray = (
        np.unique(np.concatenate([np.load(f)["source_index"] for f in adv_files]))
        if adv_files
        else np.zeros(0, np.int64)
    )
    rng = np.random.default_rng(p.seed)
    n_train = len(splits["train"]["labels"])
    test = splits["test"]
    correct = predict(clf, test["images"]) == test["labels"]  # type: ignore[arg-type]
    test_index, calib_index = clean_test_pools(correct, attacked, p.num_test, p.num_calib, p.seed)
    sets = [
        clean_set(
            "train_ref",
            splits["train"],
            np.sort(rng.choice(n_train, min(p.num_train_ref, n_train), replace=False)),
            clf,
        ),
        clean_set("calib", test, calib_index, clf),
        clean_set("test", test, test_index, clf),
    ]
    for f in adv_files:
        with np.load(f) as a:
            sets.append(
                ImageSet(
                    "adversarial",
                    a["adversarial"],
                    a["source_index"],
                    a["label"],
                    a["prediction"],
                    str(a["attack"]),
                    float(a["epsilon"]) if np.isfinite(a["epsilon"]) else None,
                    a["success"],
                )
            )
    models = {}
    for name in detectors:
        model = load_model(model_paths[name])
        models[name] = (model, params.binarize.mode if model.levels == 2 else None)
    with stage_run(
        "score", params.tracking, params=dataclasses.asdict(p), inputs=[DATA, ATTACKS, ADAPTIVE, MODELS]
    ) as run:
        table, speed = score_table(
            models, sets, p, device, progress=p.progress, threshold=params.binarize.threshold
        )
        metrics = {
            name: {
                "images_per_second": speed[name],
                "test_bpd_mean": float(table.query("model == @name and source == 'test'")["bpd"].mean()),
                "max_bpd_se": float(table.query("model == @name")["bpd_se"].max()),
            }
            for name in models
        }
        with staged_outputs(*OUTS) as (out, metrics_path):
            out.mkdir()
            table.to_parquet(out / "scores.parquet", index=False)
            for name, m in metrics.items():
                run.log_headline(m, prefix=f"score/{name}")
            write_json(metrics_path, metrics)
        print(
            f"scored {len(table)} (model, image) pairs: "
            + ", ".join(f"{n} {s:.0f} img/s" for n, s in speed.items())
        )


if __name__ == "__main__":
    run_stage(main)
