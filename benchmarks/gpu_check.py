"""Train every model of a profile on Fashion-MNIST for a fixed wall-clock budget each, on one device,
and report test NLL / BPD and throughput as JSON: the GPU check behind the README's GPU numbers.

Runs the library directly (no DVC or MLflow needed on the GPU machine):

    python benchmarks/gpu_check.py --params profiles/gpu.yaml --root /path/to/fashion-idx --minutes 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from ardetect.data import binarize_splits, prepare, save_split, training_data
from ardetect.devices import resolve_device
from ardetect.params import load_params
from ardetect.training import evaluate_nll, fit, nats_to_bpd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="profiles/gpu.yaml")
    ap.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--minutes", type=float, default=0.5, help="training budget per model")
    ap.add_argument("--epoch-images", type=int, default=20000, help="images per epoch (budget granularity)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args()
    params = load_params(args.params)
    p, b = params.data, params.binarize
    device = resolve_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        splits, source = prepare(
            p.dataset,
            args.root or p.root,
            folder / "cache",
            val_fraction=p.val_fraction,
            test_fraction=p.test_fraction,
            seed=p.seed,
            max_sizes={"train": p.max_train, "val": p.max_val, "test": p.max_test},
        )
        arrays = {k: {"images": s.images, "labels": s.labels} for k, s in splits.items()}
        for name, a in binarize_splits(arrays, b.mode, b.threshold, b.seed).items():
            save_split(folder / f"{name}.npz", **a)
        results: dict[str, object] = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "source": source,
            "minutes_per_model": args.minutes,
            "models": {},
        }
        for name in args.models or params.train.models:
            entry = params.models[name]
            tp = dataclasses.replace(
                params.train_params(name),
                max_minutes=args.minutes,
                progress=False,
                max_train_images=args.epoch_images,
                patience=1000,
                compile=params.train_params(name).compile and not args.no_compile,
            )
            data = training_data(folder, entry.levels, b.mode, b.resample_train, b.seed + tp.seed, device)
            torch.manual_seed(tp.seed)
            model = entry.build(data.image_shape, data.num_classes)
            t0 = time.perf_counter()
            result = fit(
                model, data.train, data.val, tp, checkpoint_path=folder / f"{name}.pt", device=device
            )
            test = evaluate_nll(model, data.test, tp.eval_batch_size, device).mean().item()
            row = {
                "levels": entry.levels,
                "test_nll": test,
                "test_bpd": nats_to_bpd(test, model.num_dims),
                "epochs": len(result.history),
                "images_seen": len(result.history) * args.epoch_images,
                "train_images_per_second": result.train_images_per_second,
                "seconds": time.perf_counter() - t0,
                "parameters": sum(q.numel() for q in model.parameters()),
            }
            results["models"][name] = row  # type: ignore[index]
            print(
                f"{name:>20}: test {test:8.2f} nats {row['test_bpd']:.4f} bpd | "
                f"{row['train_images_per_second']:7.0f} img/s | {row['epochs']} x {args.epoch_images}",
                flush=True,
            )
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
