"""PixelDefend purification: fast exact decoding (``purify``) against one full pass per pixel.

Both decode the same batch of test images with the same model; the script checks that they return the
same levels and reports wall and CPU seconds, forward passes and the pixels computed. Trained
checkpoints (data/models/<name>/model.pt) are used when they exist, since how fast the fixed-point
iteration converges depends on the weights; otherwise the params profile's architecture with random
weights. Writes JSON.

    python benchmarks/bench_purify.py --out benchmarks/results/purify-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ardetect.models import ARModel, load_model
from ardetect.params import load_params
from ardetect.purify import DecodeStats, purify, purify_reference


def timed(fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> tuple[torch.Tensor, float, float]:
    """The result, wall seconds and CPU seconds (this process, all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def density(name: str, params_path: str, models_dir: Path) -> tuple[ARModel, str]:
    path = models_dir / name / "model.pt"
    if path.is_file():
        return load_model(path).eval(), str(path)
    entry = load_params(params_path).models[name]
    torch.manual_seed(0)
    return entry.build((1, 28, 28)).eval(), "random init"


def images(n: int, data: Path) -> torch.Tensor:
    if data.is_file():
        return torch.as_tensor(np.load(data)["images"][:n]).float()  # (n, 1, 28, 28)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(0)).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", nargs="*", default=["pixelcnn_8bit", "gated_pixelcnn_8bit"])
    ap.add_argument("--models-dir", type=Path, default=Path("data/models"))
    ap.add_argument("--data", type=Path, default=Path("data/dataset/test.npz"))
    ap.add_argument("--batch", type=int, default=8, help="images decoded together by both methods")
    ap.add_argument("--eps", type=int, nargs="*", default=[16, 32], help="eps_defend values (levels)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default="benchmarks/results/purify-cpu.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    x = images(args.batch, args.data)
    results: dict[str, Any] = {
        "machine": {"device": platform.processor() or "cpu", "cpu_threads": args.threads},
        "torch": torch.__version__,
        "batch": len(x),
        "models": {},
    }
    for name in args.models:
        model, source = density(name, args.params, args.models_dir)
        rows = {}
        for eps in args.eps:
            stats = DecodeStats()
            with torch.inference_mode():
                fast, fast_wall, fast_cpu = timed(purify, model, x, eps, stats=stats)
                ref, ref_wall, ref_cpu = timed(purify_reference, model, x, eps)
            pixels = x.shape[-2] * x.shape[-1]
            rows[str(eps)] = {
                "identical": bool(torch.equal(fast, ref)),
                "pixels_differing": int((fast != ref).sum()),
                "reference_passes": pixels,
                "fast_passes": stats.passes,
                "fast_full_pass_equivalents": stats.pixels / pixels / len(x),
                "reference_wall_s": ref_wall,
                "fast_wall_s": fast_wall,
                "reference_cpu_s": ref_cpu,
                "fast_cpu_s": fast_cpu,
                "speedup_wall": ref_wall / fast_wall,
                "speedup_cpu": ref_cpu / fast_cpu,
            }
            r = rows[str(eps)]
            print(
                f"{name} ε={eps}: reference {ref_wall:.1f} s ({ref_cpu:.1f} s CPU), fast {fast_wall:.2f} s "
                f"({fast_cpu:.2f} s CPU, {stats.passes} passes, "
                f"{r['fast_full_pass_equivalents']:.1f} full-pass equivalents): "
                f"{r['speedup_wall']:.0f}x wall, {r['speedup_cpu']:.0f}x CPU, identical: {r['identical']}",
                flush=True,
            )
        results["models"][name] = {"weights": source, "eps_defend": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
