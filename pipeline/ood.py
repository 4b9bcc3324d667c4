"""DVC stage `ood`: AUROC of raw BPD, input complexity and the likelihood ratio at telling OOD images
(MNIST, upscaled sklearn digits, flipped test images, noise, constant images) from clean test images,
under every trained detector (see ``ardetect.ood``)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ardetect.configs import config_dataclass, load_sections
from ardetect.data import BinarizeParams, DataParams, load_split
from ardetect.devices import resolve_device
from ardetect.io import staged_outputs, write_json
from ardetect.models import load_model, trained_model_paths
from ardetect.ood import (
    IN_DISTRIBUTION,
    OodParams,
    auroc_table,
    bpd_figure,
    build_sets,
    in_distribution,
    likelihood_ratio_pairs,
    ood_problems,
    score_sets,
    sha256_of,
)
from ardetect.scoring import ScoreConfig, ScoreParams
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import ModelEntry, TrainSection, detector_models

DATA, MODELS = Path("data/dataset"), Path("data/models")
OUTS = Path("data/ood"), Path("data/metrics/ood.json")


@config_dataclass
class StageParams:
    ood: OodParams = dataclasses.field(default_factory=OodParams)
    score: ScoreParams = dataclasses.field(default_factory=ScoreParams)
    binarize: BinarizeParams = dataclasses.field(default_factory=BinarizeParams)
    data: DataParams = dataclasses.field(default_factory=DataParams)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)

    def problems(self) -> list[str]:
        return ood_problems(self.ood, self.train, self.models, self.data.dataset)


def main() -> None:
    start = time.perf_counter()
    params = load_sections(StageParams)
    p = params.ood
    device = resolve_device(p.device, "ood.device")
    detectors = detector_models(params.train, params.models)
    backgrounds = likelihood_ratio_pairs(p, params.train, params.models)
    paths = trained_model_paths(MODELS, [*detectors, *backgrounds.values()])  # fails first if one is missing
    in_dist = in_distribution(load_split(DATA / "test.npz")["images"], p.num_images, p.seed)
    built = build_sets(p.sets, in_dist, p.seed, p.mnist_root)
    sets = {IN_DISTRIBUTION: in_dist} | {name: s.images for name, s in built.items()}
    sources = {IN_DISTRIBUTION: f"{params.data.dataset} test split"} | {n: s.source for n, s in built.items()}
    models = {}
    for name, path in paths.items():
        model = load_model(path)
        models[name] = (model, params.binarize.mode if model.levels == 2 else None)
    config = ScoreConfig(num_draws=params.score.num_draws, seed=p.seed, batch_size=p.batch_size)
    with stage_run("ood", params.tracking, params=dataclasses.asdict(p), inputs=[DATA, MODELS]) as run:
        table = score_sets(
            models,
            detectors,
            backgrounds,
            sets,
            config,
            p.complexity,
            device=device,
            threshold=params.binarize.threshold,
            progress=p.progress,
        )
        aurocs = auroc_table(table)
        bpd = table[table["score"] == "bpd"].groupby(["model", "set"], sort=False)["value"].mean()
        metrics = {
            "auroc": aurocs,
            "bpd_mean": {m: {s: float(bpd[m, s]) for s in sets} for m in detectors},
            "sets": {
                s: {"n": len(images), "sha256": sha256_of(images), "source": sources[s]}
                for s, images in sets.items()
            },
            "complexity": p.complexity,
            "skipped_backgrounds": {m: b for m, b in p.background.items() if m not in backgrounds},
            "seconds": time.perf_counter() - start,
        }
        figure = bpd_figure(table)
        with staged_outputs(*OUTS) as (out, metrics_path):
            out.mkdir()
            table.to_parquet(out / "scores.parquet", index=False)
            figure.savefig(out / "ood_bpd.png", dpi=120)
            run.log_headline(
                {
                    f"{m}/{s}/{score}_auroc": v
                    for m, by_set in aurocs.items()
                    for s, by_score in by_set.items()
                    for score, v in by_score.items()
                },
                prefix="ood",
            )
            run.log_figure(figure, "ood_bpd.png")
            write_json(metrics_path, metrics)
    mnist = {
        m: {k: round(v, 3) for k, v in by_set["mnist"].items()}
        for m, by_set in aurocs.items()
        if "mnist" in by_set
    }
    print(f"ood: {len(table)} scores in {time.perf_counter() - start:.0f} s; MNIST AUROC: {mnist}")


if __name__ == "__main__":
    run_stage(main)
