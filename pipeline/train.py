"""DVC stage `train@<model>`: maximum-likelihood training of one density model from params.yaml, as one
process or under torchrun (`torchrun --standalone --nproc_per_node 8 pipeline/train.py MODEL`): every rank
trains its shard of each batch; rank 0 alone opens the MLflow run, writes checkpoints and publishes."""

from __future__ import annotations

import dataclasses
import sys
from contextlib import nullcontext

from ardetect import layout
from ardetect.configs import config_dataclass, load_sections
from ardetect.data import BinarizeParams
from ardetect.distributed import process_group
from ardetect.io import staged_outputs, write_json
from ardetect.tracking import TrackingParams, run_stage, stage_run
from ardetect.training import DensityTraining, ModelEntry, TrainSection, model_problems


@config_dataclass
class StageParams:
    binarize: BinarizeParams = dataclasses.field(default_factory=BinarizeParams)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)

    def problems(self) -> list[str]:
        return model_problems(self.train, self.models)


def main(name: str) -> None:
    with process_group() as (rank, world_size):
        params = load_sections(StageParams)
        job = DensityTraining.prepare(name, params.train, params.models, params.binarize, layout.BINARIZED)
        logged = job.logged_params(params.binarize, world_size)
        checkpoints = layout.checkpoint_dir(name)
        tracked = stage_run(f"train@{name}", params.tracking, params=logged, inputs=[layout.BINARIZED])
        with tracked if rank == 0 else nullcontext() as run:  # the other ranks only train
            result = job.fit(checkpoints, log=run.log_metrics if run else None)
            if run is None:
                return
            outs = layout.model_dir(name), layout.train_metrics(name), layout.train_plot(name)
            with staged_outputs(*outs) as (model_dir, metrics_path, plot_path):
                metrics = job.publish(result, model_dir, plot_path)
                run.log_headline(metrics, prefix=f"train/{name}")
                run.log_artifact(model_dir / "samples.png")
                run.log_artifact(plot_path, "history")
                if params.tracking.log_models:
                    run.log_torch_model(job.model.cpu(), name=name)
                write_json(metrics_path, metrics)
            job.forget_resume(checkpoints)
            print(job.summary(metrics))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python pipeline/train.py MODEL_NAME  (a key under `models` in params.yaml)")
    run_stage(main, sys.argv[1])
