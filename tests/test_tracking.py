"""MLflow used as designed: datasets, named models with signatures, system metrics, named pipeline runs;
killed stages cleaned up at the next start; user errors as one line and exit code 2.

One SQLite store serves the module (creating one costs seconds); each test logs to its own experiment.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import yaml

from ardetect.models import build_model
from ardetect.tracking import (
    HOST_TAG,
    PID_STARTED_TAG,
    PID_TAG,
    StageTerminated,
    TrackingParams,
    is_file_store,
    run_stage,
    stage_run,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("tracking_store")]  # one store


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def store(store_uri: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Any]:
    """An MlflowClient on the module's store; the test's experiment is named after the test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    monkeypatch.setenv("ARDETECT_PIPELINE_ID", request.node.name)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    mlflow.set_tracking_uri(store_uri)
    yield mlflow.MlflowClient()
    while mlflow.active_run():
        mlflow.end_run()


def tracking(request: pytest.FixtureRequest) -> TrackingParams:
    return TrackingParams(experiment=request.node.name)


def runs(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    return list(client.search_runs([exp.experiment_id])) if exp else []


def stage_runs(client: Any, experiment: str, stage: str) -> list[Any]:
    return sorted(
        (r for r in runs(client, experiment) if r.data.tags.get("dvc.stage") == stage),
        key=lambda r: r.info.start_time,
    )


def dvc_repo(path: Path, outs: list[str], deps: list[str] | None = None) -> None:
    """A DVC repository (no git) whose one stage, ``work``, runs ``work.py`` and writes ``outs``."""
    from dvc.repo import Repo

    Repo.init(str(path), no_scm=True).close()
    stage = {"cmd": "python work.py quick", "deps": ["work.py", *(deps or [])], "outs": outs}
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"work": stage}}))
    (path / "work.py").write_text(WORK)


# A stage-like script: opens stage_run for `work`, writes its output through staged_outputs, and either
# ends at once ("quick") or says "ready" and waits there to be killed ("wait").
WORK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ardetect.io import staged_outputs
    from ardetect.tracking import TrackingParams, run_stage, stage_run

    def main(mode: str) -> None:
        inputs = [Path("data/raw")]
        with stage_run("work", TrackingParams(experiment="EXPERIMENT"), params={}, inputs=inputs):
            with staged_outputs(Path("data/out")) as (tmp,):
                tmp.mkdir()
                (tmp / "x.txt").write_text(mode)
                print("ready", flush=True)
                if mode == "wait":
                    time.sleep(120)

    if __name__ == "__main__":
        run_stage(main, sys.argv[1])
    """
)


# -------------------------------------------------------------------------------- the parent run


def test_headline_metrics_and_all_params_land_on_the_parent_run_in_batches(
    store: Any, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More than one MLflow batch (100 params, 1,000 entities) of each: none lost, none renamed."""
    monkeypatch.chdir(tmp_path)
    grid = {f"k{i}": i for i in range(150)}
    all_params = {"grid": grid, "data": {"dataset": "digits"}}
    headline = {f"m{i}": i / 2 for i in range(1200)}
    with stage_run("detect", tracking(request), params={}, all_params=all_params, root=tmp_path) as run:
        run.log_headline(headline, prefix="detect")
    parent = store.get_run(run.parent_id).data
    assert parent.params == {"data.dataset": "digits", **{f"grid.k{i}": str(i) for i in range(150)}}
    assert parent.metrics == {f"detect/m{i}": i / 2 for i in range(1200)}
    assert store.get_run(run.run_id).data.metrics == headline


# ------------------------------------------------------------------------------------------- datasets


def test_inputs_are_logged_as_datasets_named_by_path_with_their_md5(
    store: Any, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside a DVC repository the digest is the md5 of the file (of the folder's files in name order)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "set").mkdir(parents=True)
    (tmp_path / "data" / "set" / "b.npz").write_bytes(b"second")
    (tmp_path / "data" / "set" / "a.npz").write_bytes(b"first")
    (tmp_path / "data" / "one.pt").write_bytes(b"weights")
    inputs = [Path("data/set"), Path("data/one.pt"), Path("data/missing")]
    with stage_run("train@made", tracking(request), params={}, inputs=inputs, root=tmp_path) as run:
        pass
    logged = {d.dataset.name: d for d in mlflow.get_run(run.run_id).inputs.dataset_inputs}
    assert set(logged) == {"data/set", "data/one.pt"}, "a missing input is skipped"
    assert logged["data/set"].dataset.digest == hashlib.md5(b"firstsecond").hexdigest()
    assert logged["data/one.pt"].dataset.digest == hashlib.md5(b"weights").hexdigest()
    assert logged["data/set"].dataset.source_type == "local"
    assert '"uri": "data/set"' in logged["data/set"].dataset.source
    assert {t.key: t.value for t in logged["data/one.pt"].tags} == {"mlflow.data.context": "train"}


@pytest.mark.slow
def test_dataset_digests_are_what_dvc_records_in_dvc_lock_even_when_the_data_changed(
    store: Any, request: pytest.FixtureRequest, tmp_path: Path, store_uri: str
) -> None:
    """Under `dvc repro` the digest is DVC's md5 of the dep: the one dvc.lock gets after the run, not
    the previous run's one that dvc.lock holds while the stage runs."""
    dvc_repo(tmp_path, outs=["data/out"], deps=["data/raw"])
    (tmp_path / "work.py").write_text(WORK.replace("EXPERIMENT", request.node.name))
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "a.txt").write_text("one")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": store_uri}
    env.pop("ARDETECT_PIPELINE_ID")

    def repro() -> str:
        proc = subprocess.run(
            [str(BIN / "dvc"), "repro"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]["work"]
        return str(next(d["md5"] for d in lock["deps"] if d["path"] == "data/raw"))

    first = repro()
    (tmp_path / "data" / "raw" / "a.txt").write_text("two")
    second = repro()
    assert first != second and first.endswith(".dir")
    logged = [
        [(d.dataset.name, d.dataset.digest) for d in r.inputs.dataset_inputs]
        for r in stage_runs(store, request.node.name, "work")
    ]
    assert logged == [[("data/raw", first)], [("data/raw", second)]]


# --------------------------------------------------------------------------------------------- models


def test_models_are_logged_by_name_with_a_signature_and_an_example_that_predicts_the_logits(
    store: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import mlflow

    from ardetect.classifier import ClassifierConfig, SmallCNN

    models = {
        "fvsbn": build_model("fvsbn", (1, 4, 4)),
        "pixelcnn_8bit": build_model("pixelcnn", (1, 4, 4), 256, channels=4, blocks=1, head_channels=4),
        "classifier": SmallCNN((1, 4, 4), ClassifierConfig(channels=(2, 2), hidden=4)),
    }
    with stage_run("train@fvsbn", tracking(request), params={}, root=tmp_path) as run:
        run.log_torch_model(models["fvsbn"])  # named after the stage's model
        run.log_torch_model(models["pixelcnn_8bit"], name="pixelcnn_8bit")
    with stage_run("classifier", tracking(request), params={}, root=tmp_path) as run:
        run.log_torch_model(models["classifier"])
    found = mlflow.search_logged_models(
        experiment_ids=[store.get_experiment_by_name(request.node.name).experiment_id], output_format="list"
    )
    assert sorted(m.name for m in found) == ["classifier", "fvsbn", "pixelcnn_8bit"]
    outputs = {"fvsbn": (-1, 1, 4, 4), "pixelcnn_8bit": (-1, 256, 1, 4, 4), "classifier": (-1, 10)}
    for logged in found:
        info = mlflow.models.get_model_info(logged.model_uri)
        (inp,), (out,) = info.signature.inputs.inputs, info.signature.outputs.inputs
        assert inp.shape == (-1, 1, 4, 4) and out.shape == outputs[logged.name]
        example = mlflow.models.Model.load(logged.model_uri).load_input_example(
            mlflow.artifacts.download_artifacts(logged.model_uri)
        )
        assert example.shape == (2, 1, 4, 4) and len(np.unique(example)) > 1
        assert not np.array_equal(example[0], example[1]), "two different images, not a blank batch"
        if logged.name == "classifier":  # gray values in [0, 1]
            assert inp.type == np.dtype("float32") and example.min() >= 0 and example.max() <= 1
        else:  # integer levels the model was built for
            assert inp.type == np.dtype("uint8") and example.max() < models[logged.name].levels
        predicted = mlflow.pyfunc.load_model(logged.model_uri).predict(example)
        model = models[logged.name].eval()
        with torch.no_grad():
            assert np.allclose(predicted, model(torch.from_numpy(example)).numpy(), atol=1e-6)


# ----------------------------------------------------------------------- system metrics, parent name


def test_runs_log_system_metrics_and_the_parent_is_named_after_the_commit_or_experiment(
    store: Any, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f.txt").write_text("x")
    subprocess.run([*git, "add", "f.txt"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "Train the 8-bit models longer"], cwd=tmp_path, check=True)
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with stage_run("score", tracking(request), params={}, root=tmp_path) as run:
        time.sleep(1.5)
    metrics = store.get_run(run.run_id).data.metrics
    assert (
        "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    )
    assert store.get_run(run.parent_id).info.run_name == f"{sha} Train the 8-bit models longer"

    (tmp_path / "f.txt").write_text("changed")
    monkeypatch.setenv("ARDETECT_PIPELINE_ID", "second")
    with stage_run("score", tracking(request), params={}, root=tmp_path) as dirty:
        pass
    assert store.get_run(dirty.parent_id).info.run_name == f"{sha}+dirty Train the 8-bit models longer"

    monkeypatch.setenv("ARDETECT_PIPELINE_ID", "third")
    monkeypatch.setenv("DVC_EXP_NAME", "longer-8bit")
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # MLflow's switch still works
    with stage_run("score", tracking(request), params={}, root=tmp_path) as named:
        time.sleep(0.6)
    assert store.get_run(named.parent_id).info.run_name == "longer-8bit"
    assert not any(k.startswith("system/") for k in store.get_run(named.run_id).data.metrics)


def test_a_file_store_gets_no_system_metrics_whose_files_would_race_with_the_stages_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """MLflow's sampler thread creates a metric file, then appends to it; a ``get_run`` in the stage's
    thread (every ``log_artifact``) in between raised "Metric 'system/...' is malformed" in CI."""
    import mlflow

    assert is_file_store((tmp_path / "mlruns").as_uri()) and is_file_store(str(tmp_path / "mlruns"))
    assert not is_file_store("sqlite:///mlflow.db") and not is_file_store("http://127.0.0.1:5000")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("ARDETECT_PIPELINE_ID", request.node.name)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    (tmp_path / "a.txt").write_text("x")
    try:
        with stage_run("attack", tracking(request), params={}, root=tmp_path) as run:
            for _ in range(20):  # 1 s of get_run calls, ten sampler periods
                run.log_artifact(tmp_path / "a.txt")
                time.sleep(0.05)
        logged = mlflow.MlflowClient(uri).get_run(run.run_id)
    finally:
        while mlflow.active_run():
            mlflow.end_run()
    assert logged.info.status == "FINISHED"
    assert not any(k.startswith("system/") for k in logged.data.metrics)


# ------------------------------------------------------------------------------------- user errors


@pytest.mark.slow  # the stage imports torch: about 5 s of CPU
def test_a_bad_params_key_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["binarize"]["thresold"] = params["binarize"].pop("threshold")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "binarize.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'never.db'}"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: params.yaml is invalid:\n")
    assert "binarize.thresold: unknown key (did you mean 'threshold'?)" in proc.stderr
    assert not (tmp_path / "never.db").exists() and not (tmp_path / "data").exists()


def test_known_user_errors_exit_2_with_their_message_and_others_keep_their_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ardetect.data import DataError
    from ardetect.training import NonFiniteLossError

    def fails(err: BaseException) -> None:
        raise err

    for err in (
        FileNotFoundError("data/dataset/train.npz does not exist; run the earlier stages first"),
        DataError("mnist.gz fails its checksum"),
        NonFiniteLossError("made: the loss became nan; lower the learning rate"),
    ):
        with pytest.raises(SystemExit) as info:
            run_stage(fails, err)  # type: ignore[arg-type]
        assert info.value.code == 2
        assert capsys.readouterr().err == f"error: {err}\n"
    with pytest.raises(ZeroDivisionError):  # a bug: propagates, and Python prints its traceback
        run_stage(fails, ZeroDivisionError("division by zero"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # a ValueError is not a ParamsError
        run_stage(fails, ValueError("bad"))  # type: ignore[arg-type]

    script = "from ardetect.tracking import run_stage\ndef main():\n    1 / 0\nrun_stage(main)\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


# ------------------------------------------------------------------------------ killed stages, cleanup


def fake_run(client: Any, experiment: str, stage: str, tags: dict[str, str]) -> str:
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    parent = client.create_run(exp_id, tags={"ardetect.kind": "pipeline"}).info.run_id
    run = client.create_run(
        exp_id, run_name=stage, tags={"dvc.stage": stage, "mlflow.parentRunId": parent, **tags}
    )
    return str(run.info.run_id)


def test_only_runs_whose_process_is_gone_are_killed_and_temp_files_wait_for_live_ones(
    store: Any, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dvc_repo(tmp_path, outs=["data/out", "data/metrics/work.json"])
    monkeypatch.chdir(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    me = psutil.Process()
    host, started = socket.gethostname(), f"{me.create_time():.2f}"
    exp = request.node.name
    ids = {
        "dead": fake_run(
            store, exp, "work", {PID_TAG: str(gone.pid), HOST_TAG: host, PID_STARTED_TAG: "1.00"}
        ),
        "reused pid": fake_run(
            store, exp, "work", {PID_TAG: str(me.pid), HOST_TAG: host, PID_STARTED_TAG: "1.00"}
        ),
        "live": fake_run(
            store, exp, "work", {PID_TAG: str(me.pid), HOST_TAG: host, PID_STARTED_TAG: started}
        ),
        "other host": fake_run(
            store, exp, "work", {PID_TAG: "1", HOST_TAG: "elsewhere", PID_STARTED_TAG: "1"}
        ),
        "no pid tag": fake_run(store, exp, "work", {}),
        "other stage": fake_run(store, exp, "train@made", {PID_TAG: str(gone.pid), HOST_TAG: host}),
    }
    (tmp_path / "data" / ".out.partial").mkdir(parents=True)
    (tmp_path / "data" / ".out.partial" / "half.npz").write_bytes(b"half")
    (tmp_path / "data" / "metrics").mkdir()
    (tmp_path / "data" / "metrics" / ".work.json.k2j3_x.tmp").write_text("{")
    keep = [tmp_path / "data" / "notes.tmp", tmp_path / "data" / ".other.json.abc.tmp"]
    for path in keep:
        path.write_text("mine")

    with stage_run("work", TrackingParams(experiment=exp), params={}, root=tmp_path):
        pass
    status = {k: store.get_run(i).info.status for k, i in ids.items()}
    assert status == {
        "dead": "KILLED",
        "reused pid": "KILLED",
        "live": "RUNNING",
        "other host": "RUNNING",
        "no pid tag": "RUNNING",
        "other stage": "RUNNING",
    }
    parent = store.get_run(ids["dead"]).data.tags["mlflow.parentRunId"]
    assert store.get_run(parent).info.status == "KILLED"
    assert (tmp_path / "data" / ".out.partial" / "half.npz").exists(), "a live run may still write it"

    store.set_terminated(ids["live"])
    with stage_run("work", TrackingParams(experiment=exp), params={}, root=tmp_path):
        pass
    assert not (tmp_path / "data" / ".out.partial").exists()
    assert not (tmp_path / "data" / "metrics" / ".work.json.k2j3_x.tmp").exists()
    assert all(path.read_text() == "mine" for path in keep)


def test_sigterm_inside_a_stage_marks_it_killed_and_restores_the_handler(
    store: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    def previous(signum: int, frame: Any) -> None:
        pass

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(StageTerminated) as info:
            with stage_run("score", tracking(request), params={}, root=tmp_path) as run:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises here at once
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)
    assert info.value.code == 128 + signal.SIGTERM
    assert store.get_run(run.run_id).info.status == "KILLED"
    assert store.get_run(run.parent_id).info.status == "KILLED"
    with pytest.raises(RuntimeError):
        with stage_run("score", tracking(request), params={}, root=tmp_path) as failed:
            raise RuntimeError("a bug")
    assert store.get_run(failed.run_id).info.status == "FAILED"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_stage_process_leaves_a_killed_run_and_no_temp_files(
    sig: signal.Signals, store: Any, request: pytest.FixtureRequest, tmp_path: Path, store_uri: str
) -> None:
    """SIGKILL runs no cleanup: the next start of the stage marks the run KILLED and sweeps its temp
    files. SIGTERM unwinds the stage itself: KILLED, no temp files, exit code 143, no traceback."""
    exp = f"killed-{sig.name}"
    dvc_repo(tmp_path, outs=["data/out"])
    (tmp_path / "work.py").write_text(WORK.replace("EXPERIMENT", exp))
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri, "OMP_NUM_THREADS": "1"}
    env.pop("ARDETECT_PIPELINE_ID")
    cmd = [sys.executable, "work.py"]
    victim = subprocess.Popen(
        [*cmd, "wait"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert victim.stdout is not None
    assert victim.stdout.readline() == "ready\n", victim.communicate()[1][-3000:]
    assert (tmp_path / "data" / ".out.partial" / "x.txt").is_file()
    victim.send_signal(sig)
    _, err = victim.communicate(timeout=60)
    (killed,) = stage_runs(store, exp, "work")
    if sig == signal.SIGKILL:
        assert victim.returncode == -signal.SIGKILL
        assert killed.info.status == "RUNNING" and (tmp_path / "data" / ".out.partial").exists()
        again = subprocess.run([*cmd, "quick"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert again.returncode == 0, again.stderr[-3000:]
        assert (
            f"work: marked KILLED the earlier run(s) {killed.info.run_id}: their process is gone"
            in again.stderr
        )
        assert "work: removed what a killed run left: data/.out.partial\n" in again.stderr
        assert (tmp_path / "data" / "out" / "x.txt").read_text() == "quick"
        assert [r.info.status for r in stage_runs(store, exp, "work")] == ["KILLED", "FINISHED"]
    else:
        assert victim.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
        assert store.get_run(killed.info.run_id).info.status == "KILLED"
    parent = store.get_run(killed.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    assert not (tmp_path / "data" / ".out.partial").exists()
