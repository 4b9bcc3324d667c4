"""DVC stage `compress`: clean test images as one ANS stream per 8-bit model; real bits per dimension vs
the model's BPD (KL = compression) and PNG/gzip/xz, and a lossless round trip (see ardetect.compression)."""

from __future__ import annotations

import dataclasses
import time

from ardetect import layout
from ardetect.compression import (
    CompressParams,
    compress_models,
    compress_problems,
    measure_models,
)
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import load_split
from ardetect.devices import resolve_device
from ardetect.io import staged_outputs, write_json
from ardetect.models import trained_model_paths
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import ModelEntry, TrainSection


@config_dataclass
class StageParams:
    compress: CompressParams = dataclasses.field(default_factory=CompressParams)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)

    def problems(self) -> list[str]:
        return compress_problems(self.compress, self.train.models, self.models)


def main() -> None:
    params = load_sections(StageParams)
    p = params.compress
    device = resolve_device(p.device, "compress.device")
    names = compress_models(p, params.train.models, params.models)
    paths = trained_model_paths(layout.MODELS, names)  # fails first, naming what is missing
    images = load_split(layout.split_path("test"))["images"][: p.num_images]  # (N, 1, H, W) uint8
    inputs = [layout.DATASET, layout.MODELS]
    with stage_run("compress", params.tracking, params=dataclasses.asdict(p), inputs=inputs) as run:
        start = time.perf_counter()
        metrics = measure_models(paths, images, p, device)
        cells = {f"{n}/{k}": float(v) for n, m in metrics.items() for k, v in m.items()}
        run.log_headline(cells, prefix="compress")
        run.log_metrics({"seconds": time.perf_counter() - start})
        with staged_outputs(layout.COMPRESS_METRICS) as (out,):
            write_json(out, metrics)


if __name__ == "__main__":
    run_stage(main)
