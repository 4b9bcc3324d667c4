"""The benchmark script measures what it says: the models and batch asked for, built from the profile,
and throughputs and FLOP fractions that follow from the same timings (speed itself is not a test's
business)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

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
            "pixelcnn_8bit_cond",
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
    assert list(rows) == ["fvsbn", "pixelcnn", "pixelcnn_8bit_cond"]
    params = load_params(ROOT / "params.yaml")
    for name, row in rows.items():
        entry = params.models[name]
        assert (row["arch"], row["levels"], row["train_batch"]) == (entry.arch, entry.levels, 4)
        classes = 10 if entry.conditional else 0  # the benchmark's default class count
        assert row["classes"] == classes
        model = entry.build((1, 4, 4), classes)
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


def tiny_profile(tmp_path: Path) -> Path:
    """The pipeline tests' tiny digits params, smaller still: two models (one binary, one 8-bit), one
    epoch, no class-conditional model, so each stage is little more than its process start."""
    from test_pipeline import tiny_params

    params = tiny_params()
    params["train"]["models"] = ["fvsbn", "pixelcnn_8bit"]
    params["train"]["defaults"].update(epochs=1, max_train_images=400, num_samples=2)
    params["adaptive"].update(conditional_model=None, sweep_steps=2)
    params["ood"].update(sets=["flipped", "noise"], num_images=10)
    params["classifier"].update(epochs=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_pipeline(tmp_path: Path, profile: Path, *extra: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "pipeline.json"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the script's file store
    script = [sys.executable, "benchmarks/gpu_pipeline.py", "--profile", str(profile), "--out", str(out)]
    done = subprocess.run(
        [*script, "--workdir", str(tmp_path / "work"), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    return json.loads(out.read_text()), done.stdout + done.stderr


def test_gpu_pipeline_runs_every_stage_and_reports_each_model(tmp_path: Path) -> None:
    profile = tiny_profile(tmp_path)
    result, log = run_pipeline(tmp_path, profile)
    assert result["complete"] is True and result["stopped"] is None, log
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    expected = {s for s in dvc if s != "train"} | {"train@fvsbn", "train@pixelcnn_8bit"}
    assert set(result["stages"]) == expected == set(result["stage_order"])
    order = result["stage_order"]
    assert order.index("ood") < order.index("report") and order.index("compress") < order.index("report")
    assert order.index("train@pixelcnn_8bit") < order.index("adaptive") < order.index("score")
    for row in result["stages"].values():
        assert row["status"] == "ok" and row["returncode"] == 0 and 0 < row["seconds"]
    assert sum(r["seconds"] for r in result["stages"].values()) <= result["full_pipeline_seconds"]
    assert result["device"] and result["torch"] and result["profile"] == str(profile)
    assert set(result["models"]) == {"fvsbn", "pixelcnn_8bit"}
    for name, row in result["models"].items():
        published = json.loads((tmp_path / "work/data/metrics/train" / f"{name}.json").read_text())
        for key in ("test_nll", "test_bpd", "train_images_per_second", "train_seconds"):
            assert math.isfinite(row[key]) and row[key] > 0 and row[key] == published[key], (name, key)
        assert row["stage_seconds"] == result["stages"][f"train@{name}"]["seconds"]
    assert (result["models"]["fvsbn"]["levels"], result["models"]["pixelcnn_8bit"]["levels"]) == (2, 256)
    assert result["best_8bit_model"] == "pixelcnn_8bit" and result["best_binary_model"] == "fvsbn"
    assert result["best_8bit_test_bpd"] == result["models"]["pixelcnn_8bit"]["test_bpd"]
    assert result["best_binary_test_nll"] == result["models"]["fvsbn"]["test_nll"]
    assert (tmp_path / "work/data/report/report.md").is_file()
    # every stage logged its MLflow run to the file store in the scratch folder (no SQLAlchemy needed)
    assert result["tracking_uri"] == (tmp_path / "work/mlruns").resolve().as_uri()
    runs = [yaml.safe_load(p.read_text()) for p in (tmp_path / "work/mlruns").glob("*/*/meta.yaml")]
    assert {r["run_name"] for r in runs} >= expected and all(r["status"] == 3 for r in runs)  # FINISHED


def test_gpu_pipeline_stops_at_the_deadline_and_writes_a_partial_result(tmp_path: Path) -> None:
    profile = tiny_profile(tmp_path)
    result, log = run_pipeline(tmp_path, profile, "--deadline-seconds", "1")
    assert result["complete"] is False and result["stopped"] == "timeout: download", log
    assert result["stages"]["download"]["status"] == "timeout"
    assert result["stages"]["download"]["seconds"] < 1 + 20  # SIGTERM, then SIGKILL after the grace
    assert set(result["stages"]) == {"download"} and not (tmp_path / "work/data/dataset").exists()
    assert result["best_8bit_test_bpd"] is None and result["full_pipeline_seconds"] > 0


def test_gpu_pipeline_stops_at_a_failed_stage(tmp_path: Path) -> None:
    profile = tiny_profile(tmp_path)
    params = yaml.safe_load(profile.read_text())
    params["adaptive"]["model"] = "fvsbn"  # invalid: the first stage validates the whole file
    profile.write_text(yaml.safe_dump(params))
    result, log = run_pipeline(tmp_path, profile)
    assert result["complete"] is False and result["stopped"] == "failed: download", log
    assert result["stages"]["download"]["returncode"] == 2 and "adaptive.model" in log
