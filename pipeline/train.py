"""DVC stage `train@<model>`: maximum-likelihood training of one density model from params.yaml.

Runs as one process (`python pipeline/train.py MODEL`, what `dvc repro` does) or as several under torchrun
(`torchrun --standalone --nproc_per_node 8 pipeline/train.py MODEL`): every rank trains its shard of
each batch; rank 0 alone opens the MLflow run, writes the checkpoints and publishes the outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from torchvision.utils import save_image

from ardetect.configs import ParamsError, config_dataclass, load_sections
from ardetect.data import BinarizeParams, mutation_resampler, training_data
from ardetect.devices import resolve_device
from ardetect.distributed import init_distributed
from ardetect.io import staged_outputs, write_json
from ardetect.models import build_model, save_model
from ardetect.tracking import StageRun, TrackingParams, run_stage, stage_run
from ardetect.training import (
    ModelEntry,
    TrainSection,
    evaluate_nll,
    fit,
    model_problems,
    model_train_params,
    nats_to_bpd,
)

DATA = Path("data/binarized")


@config_dataclass
class StageParams:
    binarize: BinarizeParams = dataclasses.field(default_factory=BinarizeParams)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)

    def problems(self) -> list[str]:
        return model_problems(self.train, self.models)


def main(name: str) -> None:
    rank, world_size = init_distributed()  # (0, 1) without torchrun
    try:
        train(name, lead=rank == 0, world_size=world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train(name: str, *, lead: bool, world_size: int) -> None:
    params = load_sections(StageParams)
    if name not in params.models:
        raise ParamsError(
            f"no model {name!r} under models in params.yaml (defined: {', '.join(params.models)})"
        )
    entry = params.models[name]
    tp = model_train_params(params.train.defaults, entry)
    device = resolve_device(tp.device, f"models.{name}.train.device (or train.defaults.device)")
    b = params.binarize
    data = training_data(DATA, entry.levels, b.mode, b.resample_train, b.seed + tp.seed, device)
    train_set = (  # a background model (Ren et al.) trains on freshly mutated images each epoch
        mutation_resampler(data.train, entry.mutation_rate, entry.levels, tp.seed)
        if entry.is_background
        else data.train
    )
    torch.manual_seed(tp.seed)  # model initialisation is part of the seeded run
    model = build_model(entry.arch, data.image_shape, levels=entry.levels, **entry.hparams)
    outs = (
        Path("data/models") / name,
        Path("data/metrics/train") / f"{name}.json",
        Path("data/plots/train") / f"{name}.csv",
    )
    logged = {
        "model": dataclasses.asdict(entry),
        "train": dataclasses.asdict(tp),
        "binarize": dataclasses.asdict(b),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "world_size": world_size,
    }
    ckpt_dir = Path("checkpoints") / name
    resume_path = ckpt_dir / "last.pt"  # the state after the last finished epoch: a killed run resumes

    tracked: AbstractContextManager[StageRun | None] = (
        stage_run(f"train@{name}", params.tracking, params=logged, inputs=[DATA])
        if lead
        else contextlib.nullcontext()
    )
    with tracked as run:  # None on ranks other than 0: they only train (fit skips their callbacks)

        def resumed(history: list[dict[str, float]]) -> None:
            assert run is not None
            print(f"{name}: resuming from {resume_path} after epoch {len(history)}", flush=True)
            for r in history:  # this is a new MLflow run: give it the whole learning curve
                run.log_metrics(r, step=int(r["epoch"]))

        result = fit(
            model,
            train_set,
            data.val,
            tp,
            checkpoint_path=ckpt_dir / "best.pt",
            device=device,
            on_epoch=lambda r: run.log_metrics(r, step=int(r["epoch"])) if run else None,
            checkpoint_extra={"name": name},
            resume_path=resume_path,
            on_resume=resumed,
        )
        if run is None:
            return
        test_nll = evaluate_nll(model, data.test, tp.eval_batch_size, device).mean().item()
        metrics = {
            "test_nll": test_nll,
            "test_bpd": nats_to_bpd(test_nll, model.num_dims),
            "best_val_nll": result.best_val_nll,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "train_seconds": result.seconds,
            "train_images_per_second": result.train_images_per_second,
        }
        samples = model.sample(tp.num_samples, torch.Generator(device=device).manual_seed(tp.seed))
        with staged_outputs(*outs) as (model_dir, metrics_path, plot_path):
            model_dir.mkdir()
            save_model(model, model_dir / "model.pt", name=name, metrics=metrics)
            save_image(
                samples.float().cpu() / (model.levels - 1), model_dir / "samples.png", nrow=8, padding=1
            )
            pd.DataFrame(result.history).to_csv(plot_path, index=False)
            run.log_headline(metrics, prefix=f"train/{name}")
            run.log_artifact(model_dir / "samples.png")
            run.log_artifact(plot_path, "history")
            if params.tracking.log_models:
                run.log_torch_model(model.cpu(), name=name)
            write_json(metrics_path, metrics)
        # Published: a rerun must train afresh (e.g. `dvc repro -f`), not return this run's result.
        # Until here a finished last.pt lets a stage killed after training skip straight to publishing.
        resume_path.unlink(missing_ok=True)
        print(
            f"{name}: test NLL {test_nll:.2f} nats, {metrics['test_bpd']:.4f} bpd "
            f"(best epoch {result.best_epoch}, {result.train_images_per_second:.0f} img/s)"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python pipeline/train.py MODEL_NAME  (a key under `models` in params.yaml)")
    run_stage(main, sys.argv[1])
