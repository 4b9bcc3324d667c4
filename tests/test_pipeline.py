"""The real dvc.yaml, end to end, on the embedded digits set with a tiny budget, in a temporary copy."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def tiny_params() -> dict[str, Any]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(dataset="digits", val_fraction=0.1, test_fraction=0.2)
    params["train"]["defaults"].update(epochs=2, batch_size=64, num_samples=16, progress=False)
    params["train"]["models"] = ["fvsbn", "nade", "made"]
    params["models"] = {
        "fvsbn": {"arch": "fvsbn", "train": {"lr": 0.01}},
        "nade": {"arch": "nade", "hparams": {"hidden": 16}},
        "made": {"arch": "made", "hparams": {"hidden": [32], "num_masks": 2, "natural_ordering": False}},
    }
    return params


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    work = tmp_path_factory.mktemp("repo")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in listed:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("tests/", "dvc.lock")):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'store.db'}",
    }
    env.pop("ARDETECT_PIPELINE_ID", None)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run([*git, "init", "-q"], work, env)
    run([*git, "add", "-A"], work, env)
    run([*git, "commit", "-qm", "snapshot"], work, env)
    out = run([str(BIN / "dvc"), "repro"], work, env)
    return work, env, out


def mlflow_runs(env: dict[str, str]) -> Any:
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=["ardetect"], output_format="list")


def test_outputs_and_metrics(repo: tuple[Path, dict[str, str], str]) -> None:
    work, env, _ = repo
    for name in ("fvsbn", "nade", "made"):
        assert (work / "data/models" / name / "model.pt").is_file()
        assert (work / "data/models" / name / "samples.png").stat().st_size > 100
        metrics = json.loads((work / "data/metrics/train" / f"{name}.json").read_text())
        assert 0.0 < metrics["test_bpd"] < 1.0
        assert metrics["test_nll"] == pytest.approx(metrics["test_bpd"] * 64 * math.log(2))
        assert metrics["best_epoch"] >= 1
        history = (work / "data/plots/train" / f"{name}.csv").read_text().splitlines()
        assert history[0].startswith("epoch,train_nll,val_nll") and len(history) == 3
    shown = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], work, env))
    flat = json.dumps(shown)
    assert "data/metrics/train/made.json" in flat and "test_bpd" in flat
    info = json.loads((work / "data/dataset/info.json").read_text())
    assert info["dataset"] == "digits" and info["splits"]["test"]["n"] == 359


def test_mlflow_parent_and_children(repo: tuple[Path, dict[str, str], str]) -> None:
    _, env, _ = repo
    runs = mlflow_runs(env)
    parents = [r for r in runs if r.data.tags.get("ardetect.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = sorted(r.data.tags["mlflow.runName"] for r in children)
    assert names == ["binarize", "download", "train@fvsbn", "train@made", "train@nade"]
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    assert parent.data.tags["git.commit"] != "unknown" and parent.data.tags["git.dirty"] == "false"
    assert "train/made/test_bpd" in parent.data.metrics
    assert parent.data.params["data.dataset"] == "digits"
    made = next(r for r in children if r.data.tags["mlflow.runName"] == "train@made")
    assert made.data.tags["dvc.stage"] == "train@made"
    assert any(k.startswith("data.data/binarized") for k in made.data.tags)
    assert made.data.params["model.hparams.num_masks"] == "2"
    import mlflow

    client = mlflow.MlflowClient()
    curve = client.get_metric_history(made.info.run_id, "val_nll")
    assert [m.step for m in curve] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(made.info.run_id)}
    assert "samples.png" in artifacts
    assert mlflow.search_logged_models(experiment_ids=[made.info.experiment_id], output_format="list")


def test_nothing_changed_runs_nothing(repo: tuple[Path, dict[str, str], str]) -> None:
    work, env, _ = repo
    before = len(mlflow_runs(env))
    out = run([str(BIN / "dvc"), "repro"], work, env)
    assert "Data and pipelines are up to date" in out
    assert len(mlflow_runs(env)) == before


def test_experiment_reruns_only_the_changed_model(repo: tuple[Path, dict[str, str], str]) -> None:
    work, env, _ = repo
    before = {r.info.run_id for r in mlflow_runs(env)}
    out = run(
        [str(BIN / "dvc"), "exp", "run", "-n", "fast-fvsbn", "-S", "models.fvsbn.train.lr=0.02"], work, env
    )
    assert "train@fvsbn" in out and "Running stage 'train@nade'" not in out
    new = [r for r in mlflow_runs(env) if r.info.run_id not in before]
    parent = next(r for r in new if r.data.tags.get("ardetect.kind") == "pipeline")
    assert parent.data.tags.get("dvc.experiment") == "fast-fvsbn"
    assert sorted(r.data.tags["mlflow.runName"] for r in new if r is not parent) == ["train@fvsbn"]
