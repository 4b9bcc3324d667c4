"""The pipeline against a real MLflow tracking server on a loopback port, checked through the REST API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from test_pipeline import BIN, mlflow_server, run, snapshot_repo, tiny_params  # the same tiny digits pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(
        f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "art")
    ) as url:
        yield url


def test_pipeline_runs_land_on_the_server(server: str, tmp_path: Path) -> None:
    params = tiny_params()
    params["train"]["models"] = ["fvsbn", "pixelcnn_8bit"]  # adaptive.model must be a trained 8-bit model
    params["adaptive"]["conditional_model"] = None  # no conditional model trained here
    params["tracking"]["experiment"] = "ardetect-server-test"
    env = snapshot_repo(tmp_path, params, server)
    run([str(BIN / "dvc"), "repro", "train@fvsbn"], tmp_path, env)
    assert not (tmp_path / "mlflow.db").exists(), "runs must go to the server, not to a local store"

    api = f"{server}/api/2.0/mlflow"
    exp = requests.get(
        f"{api}/experiments/get-by-name", params={"experiment_name": "ardetect-server-test"}, timeout=10
    ).json()["experiment"]
    runs = requests.post(
        f"{api}/runs/search", json={"experiment_ids": [exp["experiment_id"]], "max_results": 100}, timeout=10
    ).json()["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [(r, t) for r, t in zip(runs, tags) if t.get("ardetect.kind") == "pipeline"]
    assert len(parents) == 1
    parent_id = parents[0][0]["info"]["run_id"]
    children = sorted(t["mlflow.runName"] for t in tags if t.get("mlflow.parentRunId") == parent_id)
    assert children == ["binarize", "download", "train@fvsbn"]
    assert all(r["info"]["status"] == "FINISHED" for r in runs)
    train = next(r for r, t in zip(runs, tags) if t.get("mlflow.runName") == "train@fvsbn")
    metrics = {m["key"] for m in train["data"]["metrics"]}
    assert {"test_bpd", "val_nll", "train_nll"} <= metrics
    arts = requests.get(
        f"{api}/artifacts/list", params={"run_id": train["info"]["run_id"]}, timeout=10
    ).json()
    assert "samples.png" in {f["path"] for f in arts.get("files", [])}
