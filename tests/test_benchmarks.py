"""The benchmark script measures what it says: the models and batch asked for, built from the profile,
and throughputs and FLOP fractions that follow from the same timings (speed itself is not a test's
business)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ardetect.params import load_params

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a subprocess that times every measurement: about 10 s


def test_bench_models_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_models.py",
            "--params",
            "params.yaml",
            "--models",
            "fvsbn",
            "pixelcnn",
            "--shape",
            "1",
            "4",
            "4",
            "--batch",
            "4",
            "--seconds",
            "0.01",
            "--sample-n",
            "2",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.read_text())
    machine, rows = result["machine"], result["models"]
    assert machine["fp32_matmul_flops"] > 0
    assert list(rows) == ["fvsbn", "pixelcnn"]
    params = load_params(ROOT / "params.yaml")
    for name, row in rows.items():
        entry = params.models[name]
        assert (row["arch"], row["levels"], row["train_batch"]) == (entry.arch, entry.levels, 4)
        model = entry.build((1, 4, 4))
        assert row["parameters"] == sum(p.numel() for p in model.parameters()), "not the profile's model"
        assert row["train_images_per_second"] > 0 and row["score_images_per_second"] > 0
    # the FLOP rate is the counted FLOPs per step at the measured step rate, against the measured peak
    pixelcnn = rows["pixelcnn"]
    steps_per_second = pixelcnn["train_images_per_second"] / pixelcnn["train_batch"]
    assert pixelcnn["train_flops_per_step"] > 0
    assert pixelcnn["train_flops_per_second"] == pytest.approx(
        pixelcnn["train_flops_per_step"] * steps_per_second
    )
    assert pixelcnn["fraction_of_fp32_matmul_peak"] == pytest.approx(
        pixelcnn["train_flops_per_second"] / machine["fp32_matmul_flops"]
    )
    assert "train_flops_per_step" not in rows["fvsbn"], "FLOPs are counted for the PixelCNN only"
    # the printed table reports the same measurement
    assert f"{pixelcnn['fraction_of_fp32_matmul_peak']:.1%} of fp32 peak" in done.stdout
