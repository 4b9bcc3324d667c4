"""DVC stage `ood`: AUROC of raw BPD, input complexity and the likelihood ratio at telling OOD images
(MNIST, upscaled sklearn digits, flipped test images, noise, constant images) from clean test images,
under every trained detector (see ``ardetect.ood``)."""

from __future__ import annotations

import dataclasses
import time

from ardetect import layout, ood
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import BinarizeParams, DataParams, load_split
from ardetect.devices import resolve_device
from ardetect.io import staged_outputs, write_json
from ardetect.scoring import ScoreConfig, ScoreParams
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import ModelEntry, TrainSection


@config_dataclass
class StageParams:
    ood: ood.OodParams = dataclasses.field(default_factory=ood.OodParams)
    score: ScoreParams = dataclasses.field(default_factory=ScoreParams)
    binarize: BinarizeParams = dataclasses.field(default_factory=BinarizeParams)
    data: DataParams = dataclasses.field(default_factory=DataParams)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)

    def problems(self) -> list[str]:
        return ood.ood_problems(self.ood, self.train, self.models, self.data.dataset)


def main() -> None:
    start = time.perf_counter()
    params = load_sections(StageParams)
    p, b = params.ood, params.binarize
    device = resolve_device(p.device, "ood.device")
    models, detectors, backgrounds = ood.stage_models(p, params.train, params.models, layout.MODELS, b.mode)
    sets, sources = ood.stage_sets(load_split(layout.split_path("test"))["images"], p, params.data.dataset)
    config = ScoreConfig(num_draws=params.score.num_draws, seed=p.seed, batch_size=p.batch_size)
    inputs = [layout.DATASET, layout.MODELS]
    with stage_run("ood", params.tracking, params=dataclasses.asdict(p), inputs=inputs) as run:
        table = ood.score_sets(models, detectors, backgrounds, sets, config, p.complexity,
                               device=device, threshold=b.threshold, progress=p.progress)  # fmt: skip
        metrics = ood.stage_metrics(table, sets, sources, detectors, p, backgrounds)
        metrics["seconds"] = time.perf_counter() - start
        with staged_outputs(layout.OOD, layout.OOD_METRICS) as (out, metrics_path):
            out.mkdir()
            table.to_parquet(out / "scores.parquet", index=False)
            ood.bpd_figure(table).savefig(out / "ood_bpd.png", dpi=120)
            run.log_headline(ood.auroc_cells(metrics["auroc"]), prefix="ood")
            run.log_artifact(out / "ood_bpd.png")
            write_json(metrics_path, metrics)
    mnist = ood.mnist_aurocs(metrics["auroc"])
    print(f"ood: {len(table)} scores in {time.perf_counter() - start:.0f} s; MNIST AUROC: {mnist}")


if __name__ == "__main__":
    run_stage(main)
