"""DVC stage `binarize`: static (threshold) or dynamic (seeded Bernoulli) binary images, gray levels kept."""

from __future__ import annotations

import dataclasses

from ardetect import layout
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import SPLITS, BinarizeParams, binarize_splits, load_split, save_split
from ardetect.io import staged_outputs, write_json
from ardetect.tracking import TrackingParams, run_stage, stage_run

IN, OUT = layout.DATASET, layout.BINARIZED


@config_dataclass
class StageParams:
    binarize: BinarizeParams = dataclasses.field(default_factory=BinarizeParams)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)


def main() -> None:
    params = load_sections(StageParams)
    p = params.binarize
    with stage_run("binarize", params.tracking, params=dataclasses.asdict(p), inputs=[IN]) as run:
        splits = {name: load_split(IN / f"{name}.npz") for name in SPLITS}
        out = binarize_splits(splits, p.mode, p.threshold, p.seed)
        with staged_outputs(OUT) as (tmp,):
            for name, arrays in out.items():
                save_split(tmp / f"{name}.npz", **arrays)
            write_json(tmp / "info.json", {**dataclasses.asdict(p), "splits": list(out)})
        density = {f"{k}_fraction_on": float(a["binary"].mean()) for k, a in out.items()}
        run.log_headline(density, prefix="binarize")


if __name__ == "__main__":
    run_stage(main)
