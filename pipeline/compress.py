"""DVC stage `compress`: entropy-code clean test images with each 8-bit model, and compare the real size
with the model's BPD (KL = compression, measured) and with PNG, gzip and xz.

The first ``compress.num_images`` clean test images are one ANS stream per model; the first
``compress.roundtrip_images`` of them are decoded again and compared with the originals.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ardetect.compression import CompressParams, baseline_bpd, compress_models, compress_problems, measure
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import load_split
from ardetect.devices import resolve_device
from ardetect.io import staged_outputs, write_json
from ardetect.models import load_model, trained_model_paths
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import ModelEntry, TrainSection

DATA, MODELS = Path("data/dataset"), Path("data/models")
OUT = Path("data/metrics/compress.json")


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
    paths = trained_model_paths(MODELS, names)  # fails first, naming what is missing
    images = load_split(DATA / "test.npz")["images"][: p.num_images]  # (N, 1, H, W) uint8
    with stage_run("compress", params.tracking, params=dataclasses.asdict(p), inputs=[DATA, MODELS]) as run:
        start = time.perf_counter()
        baselines = baseline_bpd(images)
        metrics = {}
        for name in names:
            model = load_model(paths[name])
            m = measure(
                model,
                images,
                roundtrip_images=p.roundtrip_images,
                batch_size=p.batch_size,
                device=device,
                progress=p.progress,
            )
            metrics[name] = {**m, **baselines}
            run.log_headline({k: float(v) for k, v in metrics[name].items()}, prefix=f"compress/{name}")
            print(
                f"{name}: {m['coded_bpd']:.4f} coded vs {m['model_bpd']:.4f} model bits/dim "
                f"({m['difference']:+.4f}), round trip {'ok' if m['roundtrip_ok'] else 'FAILED'}; PNG "
                f"{baselines['png_bpd']:.3f}, gzip {baselines['gzip_bpd']:.3f}, xz {baselines['xz_bpd']:.3f}"
            )
        run.log_metrics({"seconds": time.perf_counter() - start})
        with staged_outputs(OUT) as (out,):
            write_json(out, metrics)


if __name__ == "__main__":
    run_stage(main)
