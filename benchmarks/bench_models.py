"""Speed of every model in a params profile: training, scoring and sampling images/second.

Also measures this machine's float32 matrix-multiply peak in the same run and reports PixelCNN's
training FLOP/s (counted by ``torch.utils.flop_counter``) as a fraction of it. Writes JSON.

    python benchmarks/bench_models.py --params params.yaml --out benchmarks/results-cpu.json
    python benchmarks/bench_models.py --params params-gpu.yaml --device cuda --out results-gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ardetect.models import ARModel, build_model
from ardetect.params import load_params


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


def train_step_fn(model: ARModel, x: torch.Tensor, amp: bool) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    device = x.device

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model.training_nll(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def train_flops(model: ARModel, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        model.training_nll(x).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", nargs="*", help="entries under `models` (default: all defined)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: the profile's)")
    ap.add_argument("--sample-n", type=int, default=16, help="images per sampling call (0: skip sampling)")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timing window per measurement")
    ap.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28])
    ap.add_argument("--channels-last", action="store_true", help="conv models in channels-last memory format")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
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
        },
        "params": args.params,
        "models": {},
    }
    print(f"{results['machine']['device']}: fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    for name in names:
        entry = params.models[name]
        tp = params.train_params(name)
        torch.manual_seed(0)
        model = build_model(entry.arch, shape, levels=entry.levels, **entry.hparams).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if args.compile:
            model.compile()
        bsz = args.batch or tp.batch_size
        x = batch(model, bsz, device)
        amp = tp.amp and device.type == "cuda"
        model.train()
        t_train = timed(train_step_fn(model, x, amp), device, args.seconds)
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
            "train_batch": bsz,
            "channels_last": args.channels_last,
            "compiled": args.compile,
            "train_images_per_second": bsz / t_train,
            "score_images_per_second": len(xs) / t_score,
            "sample_images_per_second": args.sample_n / t_sample,
        }
        if entry.arch == "pixelcnn":
            model.train()
            flops = train_flops(model, x)
            row["train_flops_per_step"] = flops
            row["train_flops_per_second"] = flops / t_train
            row["fraction_of_fp32_matmul_peak"] = flops / t_train / peak
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
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
