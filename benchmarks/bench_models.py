"""Speed of every model in a params profile: training, scoring and sampling images/second.

Also measures this machine's float32 matrix-multiply peak in the same run and reports PixelCNN's
training FLOP/s (counted by ``torch.utils.flop_counter``) as a fraction of it. With ``--budget-seconds S``
each model is also trained for about S seconds the way the train stage trains it (its profile's recipe on
data/binarized), and its test NLL is reported next to the throughputs: likelihood per second of compute.
Writes JSON.

    python benchmarks/bench_models.py --params params.yaml --out benchmarks/results-cpu.json
    python benchmarks/bench_models.py --models nade pixelcnn --budget-seconds 60 --out results.json
    python benchmarks/bench_models.py --params params-gpu.yaml --device cuda --out results-gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ardetect.models import ARModel
from ardetect.params import Params, load_params
from ardetect.training import DensityTraining

DATA = Path("data/binarized")  # the train stage's input (dvc repro binarize)


def timed(fn: Callable[[], Any], device: torch.device, min_seconds: float, max_iters: int = 1000) -> float:
    """Seconds per call, after a warm-up call, averaged over at least ``min_seconds``."""
    fn()
    sync(device)
    n, start = 0, time.perf_counter()
    while n < max_iters and (n == 0 or time.perf_counter() - start < min_seconds):
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - start) / n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, size: int, min_seconds: float) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    return 2 * size**3 / timed(lambda: a @ b, device, min_seconds)


def batch(model: ARModel, n: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, model.levels, (n, *model.image_shape), device=device).float()


def labels(model: ARModel, n: int, device: torch.device) -> torch.Tensor | None:
    """Random labels for a class-conditional model (its training pairs each image with one), else None."""
    return torch.randint(0, model.num_classes, (n,), device=device) if model.num_classes else None


def train_step_fn(
    model: ARModel, x: torch.Tensor, amp: bool, y: torch.Tensor | None = None
) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    device = x.device

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model.training_nll(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def train_flops(model: ARModel, x: torch.Tensor, y: torch.Tensor | None = None) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        model.training_nll(x, y).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def budget_training(
    params: Params, name: str, seconds: float, images_per_second: float, folder: Path = DATA
) -> dict[str, float]:
    """Train ``name`` as the train stage does, for about ``seconds``: its recipe with the epochs (and, if
    one epoch would not fit, the images per epoch) sized from the measured training throughput so the
    learning-rate schedule ends near the budget, and ``max_minutes`` as the hard stop (checked after each
    epoch, validation included). Returns the test NLL of the best weights and what the run took."""
    run = DensityTraining.prepare(name, params.train, params.models, params.binarize, folder)
    first = run.train(1) if callable(run.train) else run.train
    per_epoch = min(len(first), run.params.max_train_images or len(first))
    budget_images = max(run.params.batch_size, int(seconds * images_per_second))
    epoch_images = min(per_epoch, budget_images)
    recipe = dataclasses.replace(
        run.params,
        epochs=max(1, round(budget_images / epoch_images)),
        max_train_images=epoch_images,
        max_minutes=seconds / 60,
        progress=False,
    )
    run = dataclasses.replace(run, params=recipe)
    with tempfile.TemporaryDirectory() as checkpoints:
        metrics = run.metrics(run.fit(Path(checkpoints)))
    return {
        "budget_seconds": seconds,
        "budget_epochs": recipe.epochs,
        "budget_images_per_epoch": epoch_images,
        **{f"budget_{k}": float(v) for k, v in metrics.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", nargs="*", help="entries under `models` (default: all defined)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: the profile's)")
    ap.add_argument("--sample-n", type=int, default=16, help="images per sampling call (0: skip sampling)")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timing window per measurement")
    ap.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28])
    ap.add_argument(
        "--classes",
        type=int,
        default=10,
        help="class count of conditional models (MNIST, Fashion-MNIST: 10); they train on random labels "
        "and score by their exact marginal, one pass per class, as the score stage does",
    )
    ap.add_argument("--channels-last", action="store_true", help="conv models in channels-last memory format")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    ap.add_argument(
        "--budget-seconds",
        type=float,
        default=0.0,
        help="also train each model this long on data/binarized and report its test NLL (0: skip)",
    )
    ap.add_argument("--out", default="benchmarks/results.json")
    args = ap.parse_args()

    params = load_params(args.params)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 peak below is plain fp32
    peak = matmul_peak(device, 4096 if device.type == "cuda" else 1024, args.seconds)
    names = args.models or list(params.models)
    shape = tuple(args.shape)
    results: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name()
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "fp32_matmul_flops": peak,
            "load_average_1min": os.getloadavg()[0],  # other processes on a shared machine skew timings
        },
        "params": args.params,
        "models": {},
    }
    print(f"{results['machine']['device']}: fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    for name in names:
        entry = params.models[name]
        tp = params.train_params(name)
        torch.manual_seed(0)
        model = entry.build(shape, args.classes if entry.conditional else 0).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if args.compile:
            model.compile()
        bsz = args.batch or tp.batch_size
        x, y = batch(model, bsz, device), labels(model, bsz, device)
        amp = tp.amp and device.type == "cuda"
        model.train()
        t_train = timed(train_step_fn(model, x, amp, y), device, args.seconds)
        model.eval()
        xs = batch(model, tp.eval_batch_size, device)
        with torch.inference_mode():
            t_score = timed(lambda m=model, x=xs: m.log_prob(x), device, args.seconds)  # type: ignore[misc]
            t_sample = (
                timed(lambda m=model: m.sample(args.sample_n), device, 0.0, max_iters=1)  # type: ignore[misc]
                if args.sample_n
                else float("nan")
            )
        row = {
            "arch": entry.arch,
            "levels": entry.levels,
            "parameters": sum(p.numel() for p in model.parameters()),
            "classes": model.num_classes,
            "train_batch": bsz,
            "channels_last": args.channels_last,
            "compiled": args.compile,
            "train_images_per_second": bsz / t_train,
            "score_images_per_second": len(xs) / t_score,
            "sample_images_per_second": args.sample_n / t_sample,
        }
        if entry.arch == "pixelcnn":
            model.train()
            flops = train_flops(model, x, y)
            row["train_flops_per_step"] = flops
            row["train_flops_per_second"] = flops / t_train
            row["fraction_of_fp32_matmul_peak"] = flops / t_train / peak
        if args.budget_seconds > 0:
            row |= budget_training(params, name, args.budget_seconds, row["train_images_per_second"])
        results["models"][name] = row
        print(
            f"{name:>16}: train {row['train_images_per_second']:9.0f} img/s | score "
            f"{row['score_images_per_second']:9.0f} img/s | "
            f"sample {row['sample_images_per_second']:8.1f} img/s"
            + (
                f" | {row['fraction_of_fp32_matmul_peak']:.1%} of fp32 peak"
                if "train_flops_per_second" in row
                else ""
            )
            + (
                f" | {args.budget_seconds:.0f} s budget: test NLL {row['budget_test_nll']:.2f} nats "
                f"({row['budget_test_bpd']:.4f} bpd, {row['budget_epochs_run']:.0f} epochs)"
                if "budget_test_nll" in row
                else ""
            )
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
