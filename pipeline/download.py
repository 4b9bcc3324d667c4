"""DVC stage `download`: the dataset from a local folder, the Debian package or the canonical download,
split into fixed train/val/test sets of gray-level uint8 images."""

from __future__ import annotations

import dataclasses

from ardetect import layout
from ardetect.data import describe, prepare, save_split
from ardetect.io import staged_outputs, write_json
from ardetect.params import load_params
from ardetect.tracking import run_stage, stage_run

OUT, CACHE = layout.DATASET, layout.TORCHVISION_CACHE


def main() -> None:
    params = load_params()
    p = params.data
    with stage_run(
        "download", params.tracking, params=dataclasses.asdict(p), all_params=dataclasses.asdict(params)
    ) as run:
        splits, source = prepare(
            p.dataset,
            p.root,
            CACHE,
            val_fraction=p.val_fraction,
            test_fraction=p.test_fraction,
            seed=p.seed,
            max_sizes={"train": p.max_train, "val": p.max_val, "test": p.max_test},
        )
        info = {"dataset": p.dataset, "source": source, "splits": describe(splits)}
        with staged_outputs(OUT) as (tmp,):
            for name, split in splits.items():
                save_split(tmp / f"{name}.npz", images=split.images, labels=split.labels)
            write_json(tmp / "info.json", info)
        run.log_artifact(OUT / "info.json")
        run.log_headline({f"n_{k}": float(len(s.labels)) for k, s in splits.items()}, prefix="download")
        print(f"{p.dataset} from {source}: " + ", ".join(f"{k} {len(s.labels)}" for k, s in splits.items()))


if __name__ == "__main__":
    run_stage(main)
