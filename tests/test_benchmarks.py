"""The benchmark scripts run and write well-formed JSON (speed itself is not a test's business)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_models_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
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
    assert result["machine"]["fp32_matmul_flops"] > 0
    assert set(result["models"]) == {"fvsbn", "pixelcnn"}
    for row in result["models"].values():
        assert row["train_images_per_second"] > 0 and row["score_images_per_second"] > 0
    assert 0 < result["models"]["pixelcnn"]["fraction_of_fp32_matmul_peak"]
