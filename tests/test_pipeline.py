"""The real dvc.yaml, end to end, on the embedded digits set with a tiny budget, in a temporary copy."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def tiny_params(path: Path = ROOT / "params.yaml") -> dict[str, Any]:
    """``path``'s params on the embedded digits set with a tiny budget (a couple of minutes on 2 cores).
    CI's pull-request job applies it to both branches before ``dvc exp run`` (.github/workflows/ci.yml)."""
    params = yaml.safe_load(path.read_text())
    params["data"].update(dataset="digits", val_fraction=0.1, test_fraction=0.2)
    params["train"]["defaults"].update(epochs=2, batch_size=64, num_samples=16, progress=False)
    params["train"]["models"] = [
        "fvsbn", "nade", "made", "pixelcnn_8bit", "pixelcnn_8bit_cond", "pixelcnn_8bit_background"
    ]  # fmt: skip
    params["models"] = {
        "fvsbn": {"arch": "fvsbn", "train": {"lr": 0.01}},
        "nade": {"arch": "nade", "hparams": {"hidden": 16}},
        "made": {"arch": "made", "hparams": {"hidden": [32], "num_masks": 2, "natural_ordering": False}},
        "pixelcnn_8bit": {
            "arch": "pixelcnn",
            "levels": 256,
            "hparams": {"channels": 8, "blocks": 1, "head_channels": 8},
            "train": {"num_samples": 4},
        },
    }
    params["models"]["pixelcnn_8bit_background"] = {**params["models"]["pixelcnn_8bit"], "mutation_rate": 0.1}
    params["models"]["pixelcnn_8bit_cond"] = {**params["models"]["pixelcnn_8bit"], "conditional": True}
    params["train"]["defaults"]["marginal_test_images"] = 100
    params["models"]["pixelcnn_8bit"]["train"]["eval_images"] = 150  # the first 150 val and test images
    # digits is the in-distribution set here; the 28x28 sets are resized to 8x8
    params["ood"].update(num_images=20, sets=["mnist", "flipped", "noise", "constant"], progress=False)
    params["classifier"].update(epochs=10, channels=[8, 16], hidden=32, lr=0.005, patience=10, progress=False)
    params["attack"].update(
        num_images=12, cw_steps=5, cw_binary_search_steps=2, deepfool_steps=10, pgd_steps=5, progress=False
    )
    params["score"].update(num_draws=2, num_test=30, num_calib=30, num_train_ref=30, progress=False)
    params["adaptive"].update(
        num_images=8,
        pgd_steps=3,
        cw_steps=3,
        cw_binary_search_steps=1,
        sweep_images=4,
        sweep_steps=3,
        conditional_images=4,
        conditional_steps=2,
        progress=False,
    )
    params["detect"].update(n_boot=50)
    params["compress"].update(num_images=20, roundtrip_images=1, progress=False)
    params["purify"].update(num_images=8, eps_defend=[16], bpda_images=4, bpda_steps=2, progress=False)
    return params


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def snapshot_repo(work: Path, params: dict[str, Any], tracking_uri: str) -> dict[str, str]:
    """A committed copy of the project in ``work`` with ``params``; the env that runs its stages."""
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
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": tracking_uri,
    }
    env.pop("ARDETECT_PIPELINE_ID", None)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run([*git, "init", "-q"], work, env)
    run([*git, "add", "-A"], work, env)
    run([*git, "commit", "-qm", "snapshot"], work, env)
    return env


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    work = tmp_path_factory.mktemp("repo")
    env = snapshot_repo(work, tiny_params(), f"sqlite:///{work / 'store.db'}")
    out = run([str(BIN / "dvc"), "repro"], work, env)
    return work, env, out


def mlflow_runs(env: dict[str, str]) -> Any:
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=["ardetect"], output_format="list")


def metrics_of(work: Path, name: str) -> dict[str, float]:
    return dict(json.loads((work / "data/metrics/train" / f"{name}.json").read_text()))


def test_outputs_and_metrics(repo: tuple[Path, dict[str, str], str]) -> None:
    work, env, _ = repo
    for name in ("fvsbn", "nade", "made", "pixelcnn_8bit", "pixelcnn_8bit_cond"):
        assert (work / "data/models" / name / "model.pt").is_file()
        assert (work / "data/models" / name / "samples.png").stat().st_size > 100
        metrics = json.loads((work / "data/metrics/train" / f"{name}.json").read_text())
        assert 0.0 < metrics["test_bpd"] < (8.0 if "8bit" in name else 1.0)  # below uniform
        assert metrics["test_nll"] == pytest.approx(metrics["test_bpd"] * 64 * math.log(2))
        assert metrics["best_epoch"] >= 1
        assert 0.0 < metrics["test_bpd_se"] < 0.1 * metrics["test_bpd"]
        cut = {"pixelcnn_8bit": 150, "pixelcnn_8bit_cond": 100}  # eval_images, marginal_test_images
        if name in cut:
            assert metrics["test_images"] == cut[name]
        else:
            assert metrics["test_images"] > 150
        history = (work / "data/plots/train" / f"{name}.csv").read_text().splitlines()
        assert history[0].startswith("epoch,train_nll,val_nll") and len(history) == 3
    # dvc metrics show: the compact headline only, one row per density model, the same keys in each
    shown = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], work, env))
    files = next(iter(shown.values()))["data"]
    cond = [
        "pixelcnn_8bit_cond",
        *(f"pixelcnn_8bit_cond-{s}" for s in ("pred", "disagree", "surprise", "combined")),
    ]
    assert set(files) == {
        f"data/metrics/headline/{m}.json" for m in ("fvsbn", "nade", "made", "pixelcnn_8bit", *cond)
    }
    made = files["data/metrics/headline/made.json"]["data"]
    assert made["test_bpd"] == pytest.approx(metrics_of(work, "made")["test_bpd"], abs=1e-4)
    table = run([str(BIN / "dvc"), "metrics", "show"], work, env)
    assert max(len(line) for line in table.splitlines()) <= 200, table
    info = json.loads((work / "data/dataset/info.json").read_text())
    assert info["dataset"] == "digits" and info["splits"]["test"]["n"] == 359


def test_detection_outputs(repo: tuple[Path, dict[str, str], str]) -> None:
    import pandas as pd

    work, env, _ = repo
    clf = json.loads((work / "data/metrics/classifier.json").read_text())
    assert 0.5 < clf["test_accuracy"] <= 1.0
    attack = json.loads((work / "data/metrics/attack.json").read_text())
    assert {"fgsm_e8", "pgd_e25", "deepfool", "cw", "noise_e51"} <= set(attack)
    assert attack["pgd_e51"]["success_after_rounding"] > attack["noise_e51"]["success_after_rounding"]
    scores = pd.read_parquet(work / "data/scores/scores.parquet")
    scorers = {"fvsbn", "nade", "made", "pixelcnn_8bit", "pixelcnn_8bit_cond"}
    cond = {f"pixelcnn_8bit_cond-{s}" for s in ("pred", "disagree", "surprise")}  # the conditional model's
    assert set(scores["model"]) == scorers | cond
    assert set(scores["source"]) == {"train_ref", "calib", "test", "adversarial"}
    binary = scores[scores["model"] == "made"]
    assert (binary["bpd_se"] > 0).any(), "dynamic binarisation reports a Monte-Carlo standard error"
    assert (scores.loc[scores["model"] == "pixelcnn_8bit", "bpd_se"] == 0).all()
    detection = json.loads((work / "data/metrics/detection.json").read_text())
    row = detection["pixelcnn_8bit"]["pgd_e51"]
    assert 0.0 <= row["ci_low"] <= row["auroc"] <= row["ci_high"] <= 1.0 and row["n_pos"] > 0
    report = (work / "data/report/report.md").read_text()
    for needle in (
        "## AUROC by model and attack set",
        "## Oblivious vs adaptive attacks",
        "False-positive rate realized",
        "Classifier accuracy",
        "pixelcnn_8bit",
        "roc.png",
        "bpd_densities.png",
        "pvalues.png",
        "sweep.png",
        "## Out-of-distribution detection",
        "## Compression: BPD is a code length",
        "## PixelDefend purification",
    ):
        assert needle in report, needle
    assert (
        report.index("## AUROC by model")
        < report.index("## Oblivious vs adaptive")
        < report.index("## Detection")
    )
    for fig in ("roc.png", "bpd_densities.png", "pvalues.png"):
        assert (work / "data/report" / fig).stat().st_size > 1000
    adaptive = json.loads((work / "data/metrics/adaptive.json").read_text())
    assert adaptive["model"] == "pixelcnn_8bit" and set(adaptive["sets"]) == {
        "adaptive_pgd_e8",
        "adaptive_pgd_e25",
        "adaptive_cw",
    }
    conditional = adaptive["conditional"]
    assert conditional["model"] == "pixelcnn_8bit_cond"
    assert set(conditional["sets"]) == {"adaptive_cond_pgd_e8", "adaptive_cond_cw"}
    for m in [*adaptive["sets"].values(), *conditional["sets"].values()]:
        assert m["n"] in (8, 4) and 0 <= m["joint_success"] <= m["classifier_success"]
    adv = scores[scores["attack"].fillna("").str.startswith("adaptive_")]
    assert set(adv["model"]) == scorers | cond and len(adv) == len(scorers | cond) * (3 * 8 + 2 * 4)
    assert "pixelcnn_8bit_cond-combined" in detection and "## Class-conditional detector" in report
    gen = json.loads((work / "data/metrics/train/pixelcnn_8bit_cond.json").read_text())
    assert 0 <= gen["gen_accuracy"] <= 1 and gen["test_marginal_images"] == 100
    assert "adaptive_pgd_e8" in detection["pixelcnn_8bit"] or adv["success"].sum() == 0
    compressed = json.loads((work / "data/metrics/compress.json").read_text())
    assert set(compressed) == {"pixelcnn_8bit"} and compressed["pixelcnn_8bit"]["roundtrip_ok"]
    # 20 images of 8x8: the stream's fixed overhead (its initial state, some 64 bits) is ~0.05 bpd here
    assert abs(compressed["pixelcnn_8bit"]["coded_bpd"] - compressed["pixelcnn_8bit"]["model_bpd"]) < 0.15
    purified = json.loads((work / "data/metrics/purify.json").read_text())["pixelcnn_8bit"]["16"]
    assert {"clean", "bpda_pgd_e8", "pgd_e8"} <= set(purified)
    assert purified["clean"]["n"] == 8  # a set may be empty: every one of its images a CW failure sentinel
    assert all(0 <= m["accuracy_after"] <= 1 for m in purified.values() if m["n"] > 0)
    ood = json.loads((work / "data/metrics/ood.json").read_text())
    assert "likelihood_ratio" in ood["auroc"]["pixelcnn_8bit"]["mnist"]
    roc = pd.read_csv(work / "data/plots/roc/pixelcnn_8bit.csv")
    assert list(roc.columns) == ["fpr", "tpr", "curve", "point"] and roc["tpr"].between(0, 1).all()
    html = run([str(BIN / "dvc"), "plots", "show", "--out", str(work / "plots-html")], work, env)
    page = (work / "plots-html" / "index.html").read_text()
    assert "data/plots/roc/pixelcnn_8bit.csv" in page and "pgd_e51" in page, html


def test_mlflow_parent_and_children(repo: tuple[Path, dict[str, str], str]) -> None:
    _, env, _ = repo
    runs = mlflow_runs(env)
    parents = [r for r in runs if r.data.tags.get("ardetect.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    names = sorted(r.data.tags["mlflow.runName"] for r in children)
    assert names == [
        "adaptive",
        "attack",
        "binarize",
        "classifier",
        "compress",
        "detect",
        "download",
        "ood",
        "purify",
        "report",
        "score",
        "train@fvsbn",
        "train@made",
        "train@nade",
        "train@pixelcnn_8bit",
        "train@pixelcnn_8bit_background",
        "train@pixelcnn_8bit_cond",
    ]
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    assert parent.data.tags["git.commit"] != "unknown" and parent.data.tags["git.dirty"] == "false"
    assert "train/made/test_bpd" in parent.data.metrics
    assert "adaptive/adaptive_pgd_e8/joint_success" in parent.data.metrics
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


def test_rerunning_the_attacks_reproduces_them_byte_for_byte(repo: tuple[Path, dict[str, str], str]) -> None:
    """Seeded attacks write identical files (no wall times in cached outputs), so forcing the stage
    again leaves every downstream stage up to date."""
    work, env, _ = repo
    run([str(BIN / "dvc"), "repro", "--force", "--single-item", "attack"], work, env)
    status = run([str(BIN / "dvc"), "status"], work, env)
    assert "Data and pipelines are up to date" in status, status


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
    # fvsbn retrains; score, detect, ood and report follow it, and compress (it reads data/models); the
    # other models, the classifier, the attacks and purification are untouched
    assert sorted(r.data.tags["mlflow.runName"] for r in new if r is not parent) == [
        "compress",
        "detect",
        "ood",
        "report",
        "score",
        "train@fvsbn",
    ]


def test_queued_experiments_land_in_the_workspace_store(repo: tuple[Path, dict[str, str], str]) -> None:
    """`dvc exp run --queue` + `dvc queue start` run in temporary copies; their runs still reach the
    repository's own MLflow store (via DVC_ROOT) and `dvc exp show` lists their metrics."""
    work, env, _ = repo
    local = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the default store: mlflow.db
    run(
        [str(BIN / "dvc"), "exp", "run", "--queue", "-n", "queued-lr", "-S", "models.fvsbn.train.lr=0.005"],
        work,
        local,
    )
    run([str(BIN / "dvc"), "queue", "start", "--jobs", "1"], work, local)
    deadline = time.monotonic() + 600
    while True:
        status = run([str(BIN / "dvc"), "queue", "status"], work, local)
        if "queued-lr" in status and not any(s in status for s in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert "Success" in status, status
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], work, local))
    assert "queued-lr" in json.dumps(shown)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ardetect"], output_format="list")
    parent = next(
        r
        for r in runs
        if r.data.tags.get("dvc.experiment") == "queued-lr" and "ardetect.pipeline_id" in r.data.tags
    )
    names = sorted(
        r.data.tags["mlflow.runName"]
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    )
    assert names == ["compress", "detect", "ood", "report", "score", "train@fvsbn"]


@contextmanager
def mlflow_server(backend_uri: str, *extra: str, log: Path | None = None) -> Iterator[str]:
    """``mlflow server`` on a free loopback port, up (answering /health) for the block; yields its URL.
    With ``log``, the server's output (its access log included) goes to that file."""
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    out = open(log, "w") if log is not None else subprocess.DEVNULL  # closed after the server stops
    proc = subprocess.Popen(
        [*cmd, "--backend-store-uri", backend_uri, *extra],
        stdout=out,
        stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # access-log lines reach the file as they happen
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or slow to answer
                pass
            assert proc.poll() is None, "mlflow server exited during start-up"
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 90 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log is not None:
            out.close()  # type: ignore[union-attr]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("ARDETECT_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def chromium(url: str, *flags: str) -> tuple[str, list[str]]:
    """Headless Debian Chromium, offline-safe flags, a fresh profile; returns stdout and the page's
    uncaught JavaScript errors (console lines of its log)."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=20000",
                "--window-size=1400,900",
                "--enable-logging=stderr",
                "--v=0",
                *flags,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln and "Uncaught" in ln]
    return proc.stdout, errors


class DrawnPlots(HTMLParser):
    """For every element with an id: whether a <canvas> or <svg> (what Vega draws) lies inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str | None] = []  # the id (or None) of each open element
        self.drawn: dict[str, bool] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("canvas", "svg"):
            for element_id in filter(None, self.open):
                self.drawn[element_id] = True
        if tag in VOID_TAGS:
            return
        element_id = dict(attrs).get("id")
        if element_id:
            self.drawn.setdefault(element_id, False)
        self.open.append(element_id)

    def handle_endtag(self, tag: str) -> None:
        if tag not in VOID_TAGS and self.open:
            self.open.pop()


VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make test` installs it)")
def test_mlflow_ui_and_dvc_plots_in_a_real_browser(repo: tuple[Path, dict[str, str], str]) -> None:
    """The MLflow UI lists the pipeline's parent run, and `dvc plots show` draws the ROC plot; the
    screenshots are kept in test-artifacts/ (or $ARDETECT_TEST_ARTIFACTS). DVC's page loads Vega from a
    CDN, which this machine cannot reach: the test installs the same Vega releases from the npm
    registry and renders the page through an HTML template that loads them locally."""
    import requests

    work, env, _ = repo
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = work / "mlflow-server.log"
    with mlflow_server(env["MLFLOW_TRACKING_URI"], log=log) as url:
        api = f"{url}/api/2.0/mlflow"
        exp = requests.get(
            f"{api}/experiments/get-by-name", params={"experiment_name": "ardetect"}, timeout=10
        ).json()["experiment"]
        runs = requests.post(
            f"{api}/runs/search", json={"experiment_ids": [exp["experiment_id"]]}, timeout=10
        ).json()["runs"]
        parent = next(
            r for r in runs if {"key": "ardetect.kind", "value": "pipeline"} in r["data"].get("tags", [])
        )
        page = f"{url}/#/experiments/{exp['experiment_id']}/runs"
        served = len(log.read_text().splitlines())
        dom, errors = chromium(page, "--dump-dom")
        requests_made = log.read_text().splitlines()[served:]
        assert parent["info"]["run_name"] in dom, "the pipeline's parent run is not on the experiment page"
        assert not errors, f"uncaught JavaScript errors on the MLflow UI: {errors}"
        # the page asked the tracking server for the experiment's runs through MLflow's REST API (which
        # the UI reaches under /ajax-api or /api), and the server answered every request without a 5xx
        assert any(re.search(r'"POST /[\w-]+/2\.0/mlflow/runs/search', ln) for ln in requests_made), (
            requests_made
        )
        failed = [ln for ln in requests_made if re.search(r'HTTP/[\d.]+" 5\d\d', ln)]
        assert not failed, f"server errors while the UI loaded: {failed}"
        chromium(page, f"--screenshot={ARTIFACTS / 'mlflow-experiment.png'}")
    assert (ARTIFACTS / "mlflow-experiment.png").stat().st_size > 10_000

    html_dir = work / "plots-browser"
    template = work / "offline-plots.html"
    template.write_text(OFFLINE_PLOTS_PAGE)
    vega_offline(html_dir / "vendor")
    run(
        [str(BIN / "dvc"), "plots", "show", "--html-template", str(template), "--out", str(html_dir)],
        work,
        env,
    )
    index = html_dir / "index.html"
    page_source = DrawnPlots()
    page_source.feed(index.read_text())
    plot_ids = list(page_source.drawn)  # the template's only ids: one empty div per plot, until Vega draws
    assert "data_plots_roc_pixelcnn_8bit_csv" in plot_ids, "no ROC plot for the 8-bit model on the page"
    dom, errors = chromium(index.as_uri(), "--dump-dom")
    assert not errors, f"uncaught JavaScript errors on the dvc plots page: {errors}"
    parser = DrawnPlots()
    parser.feed(dom)
    undrawn = [i for i in plot_ids if not parser.drawn.get(i)]
    assert not undrawn, f"Vega drew nothing in {undrawn}"
    chromium(index.as_uri(), f"--screenshot={ARTIFACTS / 'dvc-plots.png'}")
    assert (ARTIFACTS / "dvc-plots.png").stat().st_size > 20_000


OFFLINE_PLOTS_PAGE = """<!DOCTYPE html>
<html>
<head>
    <title>DVC Plot</title>
    <script src="vendor/vega.min.js"></script>
    <script src="vendor/vega-lite.min.js"></script>
    <script src="vendor/vega-embed.min.js"></script>
</head>
<body>
    {plot_divs}
</body>
</html>"""
VEGA = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}  # the releases dvc_render loads


def vega_offline(dest: Path) -> None:
    """Vega, Vega-Lite and Vega-Embed from the npm registry, copied into ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot fetch Vega to draw the dvc plots page offline")
    with tempfile.TemporaryDirectory() as prefix:
        subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                prefix,
                "--no-audit",
                "--no-fund",
                "--legacy-peer-deps",
                "--silent",
                *(f"{name}@{version}" for name, version in VEGA.items()),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        dest.mkdir(parents=True, exist_ok=True)
        for name in VEGA:
            shutil.copy(Path(prefix) / "node_modules" / name / "build" / f"{name}.min.js", dest)
