"""The fault matrix: each fault fails with a clear error and leaves no output that looks complete.

* training killed (SIGKILL) mid-way: here; it resumes from ``last.pt`` to the same weights as an
  uninterrupted run;
* a corrupted or truncated data file: tests/test_data.py
  (``test_a_truncated_file_fails_its_checksum_naming_the_file``,
  ``test_gz_that_fails_torchvision_md5_is_rejected``);
* a missing model checkpoint for ``score``: here;
* a write that fails while saving a checkpoint (disk full): here, in ``atomic_torch_save`` and in ``fit``;
* a NaN loss: tests/test_training.py
  (``test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint``);
* a typo in params.yaml: tests/test_params.py (``test_bad_params_name_the_key_value_and_rule``);
* an unreachable MLflow tracking server: here; fails in seconds, names the URI and the fix, and never
  falls back to a local store;
* unsafe pickles in checkpoints: here; ``weights_only=True`` loads ours and refuses anything else.
"""

from __future__ import annotations

import dataclasses
import errno
import http.server
import importlib.util
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor
from toys import row_copies

from ardetect.models import atomic_torch_save, build_model, load_checkpoint, load_model, save_model
from ardetect.tracking import (
    TrackingParams,
    TrackingUnavailableError,
    bound_mlflow_http_retries,
    check_tracking_server,
    stage_run,
)
from ardetect.training import ResumeIgnoredWarning, TrainParams, fit

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add sync cost
PARAMS = TrainParams(
    batch_size=16, epochs=6, lr=0.01, patience=100, progress=False, eval_batch_size=64, device="cpu"
)
TIMING = {"epoch_seconds", "train_images_per_second"}  # history fields that differ between runs


toy_data = row_copies  # binary 4x4 images whose rows copy their first pixel


def assert_same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


# ------------------------------------------------------------------------------ resume after SIGKILL

SCRIPT = """
import sys, time
from pathlib import Path
import torch

torch.set_num_threads(1)
from ardetect.models import build_model
from ardetect.training import TrainParams, fit

out, pause = Path(sys.argv[1]), float(sys.argv[2])
g = torch.Generator().manual_seed(0)
probs = torch.rand(96, 1, 4, 4, generator=g)  # "gray levels" in [0, 1]
val = torch.bernoulli(torch.rand(64, 1, 4, 4, generator=g), generator=g)


def draw(epoch):  # dynamic binarisation from the global RNG: resuming must restore it exactly
    return torch.bernoulli(probs)


def on_epoch(record):
    print(f"epoch {int(record['epoch'])}", flush=True)
    time.sleep(pause)


params = TrainParams(
    batch_size=16, epochs=EPOCHS, lr=0.01, lr_schedule="cosine", patience=1000, progress=False,
    eval_batch_size=64, device="cpu",
)
torch.manual_seed(0)
model = build_model("made", (1, 4, 4), hidden=[16], num_masks=2, natural_ordering=False)
fit(
    model, draw, val, params, checkpoint_path=out / "best.pt", device=torch.device("cpu"),
    on_epoch=on_epoch, resume_path=out / "last.pt",
    on_resume=lambda history: print(f"resumed {len(history)}", flush=True),
)
torch.save(model.state_dict(), out / "final.pt")
print("done", flush=True)
"""
EPOCHS = 40


def epochs_run(stdout: str) -> list[int]:
    return [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("epoch ")]


@pytest.mark.slow  # two training processes of 40 epochs, one killed: about 25 s
def test_a_killed_training_process_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """MADE with 2 masks (a Python step counter picks the mask) on freshly drawn images every epoch."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.replace("EPOCHS", str(EPOCHS)))
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(out: Path, pause: float) -> subprocess.Popen[str]:
        cmd = [sys.executable, str(script), str(out), str(pause)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    victim = start(run, 0.05)
    assert victim.stdout is not None
    while True:
        line = victim.stdout.readline()
        assert line, f"training ended before it could be killed:\n{victim.communicate()[1][-3000:]}"
        if line.strip() == "epoch 3":  # epochs 1-2 are complete and saved to last.pt
            break
    assert (run / "last.pt").is_file()
    time.sleep(0.1)  # kill somewhere in the next epoch or two: mid-step, mid-save or mid-pause
    assert victim.poll() is None, "training finished before the kill; make its epochs slower"
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert not (run / "final.pt").exists()
    killed_at = load_checkpoint(run / "last.pt")["epoch"]
    assert 2 <= killed_at < EPOCHS

    resumed, reference = start(run, 0.0), start(ref, 0.0)  # the rerun, and a run never interrupted
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed {killed_at}\n" in out, out
    assert epochs_run(out) == list(range(killed_at + 1, EPOCHS + 1)), "only the epochs left are trained"
    out, err = reference.communicate(timeout=120)
    assert reference.returncode == 0, err[-3000:]
    assert "resumed" not in out and epochs_run(out) == list(range(1, EPOCHS + 1))

    assert_same_tensors(torch.load(ref / "final.pt"), torch.load(run / "final.pt"))
    # the whole final training state matches too: last-epoch weights, Adam moments, RNGs, mask counter
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["finished"] and b["finished"] and a["epoch"] == b["epoch"] == EPOCHS
    assert_same_tensors(a["model"], b["model"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_tensors(pa, pb)
    assert torch.equal(a["generator"], b["generator"]) and torch.equal(a["torch_rng"], b["torch_rng"])
    assert (
        a["model_training_state"] == b["model_training_state"] == {"train_steps": 6 * EPOCHS, "mask_index": 1}
    )
    assert a["scheduler"] == b["scheduler"]
    assert without_timing(a["history"]) == without_timing(b["history"])


# --------------------------------------------------------------------------- resume, in one process


class Interrupted(Exception):
    pass


def train_run(
    name: str,
    params: TrainParams,
    folder: Path,
    *,
    train: Tensor | None = None,
    val: Tensor | None = None,
    stop_after: int | None = None,
    resumed: list[int] | None = None,
) -> tuple[Any, dict[str, Tensor]]:
    """One fit from the same seeded start; ``stop_after=k`` interrupts it after epoch k's record."""
    torch.manual_seed(0)
    hp = {"nade": {"hidden": 8}, "made": {"hidden": [16], "num_masks": 3}}.get(name, {})
    model = build_model(name, (1, 4, 4), **hp)

    def on_epoch(record: dict[str, float]) -> None:
        if stop_after is not None and record["epoch"] == stop_after + 1:
            raise Interrupted  # before epoch stop_after+1 is saved: last.pt holds epoch stop_after

    result = fit(
        model,
        toy_data(128, 0) if train is None else train,
        toy_data(64, 1) if val is None else val,
        params,
        checkpoint_path=folder / "best.pt",
        device=CPU,
        on_epoch=on_epoch,
        resume_path=folder / "last.pt",
        on_resume=lambda h: (resumed if resumed is not None else []).append(len(h)),
    )
    return result, model.state_dict()


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("fvsbn", {"lr_schedule": "plateau", "grad_clip": None}),
        ("nade", {"lr_schedule": "constant", "max_train_images": 80, "weight_decay": 1e-4}),
        ("made", {"lr_schedule": "cosine", "patience": 3, "epochs": 30}),  # stops early (see below)
    ],
)
def test_an_interrupted_fit_resumes_to_the_same_result(
    name: str, changes: dict[str, Any], tmp_path: Path
) -> None:
    params = dataclasses.replace(PARAMS, **changes)
    # MADE: all-zero training images make all-one validation images ever less likely (early stop)
    data = {"train": torch.zeros(128, 1, 4, 4), "val": torch.ones(64, 1, 4, 4)} if name == "made" else {}
    ref, ref_weights = train_run(name, params, tmp_path / "ref", **data)
    with pytest.raises(Interrupted):
        train_run(name, params, tmp_path / "run", stop_after=2, **data)
    resumed: list[int] = []
    result, weights = train_run(name, params, tmp_path / "run", resumed=resumed, **data)
    assert resumed == [2]
    assert_same_tensors(ref_weights, weights)
    assert (result.best_epoch, result.best_val_nll) == (ref.best_epoch, ref.best_val_nll)
    assert without_timing(result.history) == without_timing(ref.history)
    if name == "made":
        assert len(ref.history) < params.epochs, "meant to cover a run that stopped early"


def test_a_finished_run_returns_at_once_and_a_stale_one_is_ignored(tmp_path: Path) -> None:
    first, weights = train_run("fvsbn", PARAMS, tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["finished"]
    resumed: list[int] = []
    again, same = train_run("fvsbn", PARAMS, tmp_path, stop_after=0, resumed=resumed)  # no epoch may run
    assert resumed == [PARAMS.epochs] and again.history == first.history
    assert_same_tensors(weights, same)

    longer = dataclasses.replace(PARAMS, epochs=PARAMS.epochs + 1)
    with pytest.warns(ResumeIgnoredWarning, match=r"another run \(train_params.epochs \(6 -> 7\)\)"):
        result, _ = train_run("fvsbn", longer, tmp_path, resumed=resumed)
    assert len(result.history) == 7 and resumed == [PARAMS.epochs]
    with pytest.warns(ResumeIgnoredWarning, match=r"another run \(train_images"):
        train_run("fvsbn", longer, tmp_path, train=toy_data(128, 5))
    with pytest.warns(ResumeIgnoredWarning, match=r"another run \(arch \('fvsbn' -> 'made'\)"):
        train_run("made", PARAMS, tmp_path)


def test_a_resume_restores_a_lost_best_checkpoint_and_ignores_an_unreadable_file(tmp_path: Path) -> None:
    _, ref_weights = train_run("fvsbn", PARAMS, tmp_path / "ref")
    with pytest.raises(Interrupted):
        train_run("fvsbn", PARAMS, tmp_path, stop_after=2)
    (tmp_path / "best.pt").unlink()  # or a kill between writing best.pt and last.pt: last.pt has a copy
    with pytest.raises(Interrupted):
        train_run("fvsbn", PARAMS, tmp_path, stop_after=3)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 3
    (tmp_path / "best.pt").unlink()
    _, weights = train_run("fvsbn", PARAMS, tmp_path)
    assert_same_tensors(ref_weights, weights)

    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    resumed: list[int] = []
    with pytest.warns(ResumeIgnoredWarning, match="cannot be read"):
        result, _ = train_run("fvsbn", PARAMS, tmp_path, resumed=resumed)
    assert resumed == [] and len(result.history) == PARAMS.epochs


# ------------------------------------------------------------------------ a write fails (disk full)


def disk_full_after(calls: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the ``calls``-th ``torch.save`` (and later ones) write half a file, then fail with ENOSPC."""
    real, seen = torch.save, []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(str(f))
        real(obj, f, *args, **kwargs)
        if len(seen) >= calls:
            size = os.path.getsize(f)
            with open(f, "r+b") as fh:
                fh.truncate(size // 2)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", save)
    return seen


def test_a_failed_checkpoint_write_keeps_the_previous_file_and_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_model("fvsbn", (1, 4, 4))
    good, fresh = tmp_path / "ckpt" / "best.pt", tmp_path / "ckpt" / "new.pt"
    save_model(model, good, epoch=1)
    before = good.read_bytes()
    disk_full_after(1, monkeypatch)
    with torch.no_grad():
        model.linear.weight.add_(1.0)  # type: ignore[operator]
    with pytest.raises(OSError, match="No space left on device"):
        save_model(model, good, epoch=2)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_torch_save({"x": torch.ones(3)}, fresh)
    assert good.read_bytes() == before and load_checkpoint(good)["epoch"] == 1
    assert not fresh.exists()
    assert sorted(p.name for p in good.parent.iterdir()) == ["best.pt"], "no temp files left behind"


def test_a_disk_full_during_fit_stops_it_and_a_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ref_weights = train_run("nade", PARAMS, tmp_path / "ref")
    seen = disk_full_after(6, monkeypatch)  # best + last per improving epoch: fails in epoch 3
    with pytest.raises(OSError, match="No space left on device"):
        train_run("nade", PARAMS, tmp_path / "run")
    assert len(seen) == 6
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2  # the last complete epoch
    monkeypatch.undo()
    resumed: list[int] = []
    _, weights = train_run("nade", PARAMS, tmp_path / "run", resumed=resumed)
    assert resumed == [2]
    assert_same_tensors(ref_weights, weights)


# ------------------------------------------------------------------- score without a trained model


def test_score_without_a_trained_model_names_it_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["models"] = ["fvsbn", "made", "pixelcnn_8bit"]
    params["score"]["device"] = "cpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    save_model(build_model("fvsbn", (1, 4, 4)), tmp_path / "data" / "models" / "fvsbn" / "model.pt")
    eight_bit = build_model("pixelcnn", (1, 4, 4), 256, channels=4, blocks=1, head_channels=4)
    save_model(eight_bit, tmp_path / "data" / "models" / "pixelcnn_8bit" / "model.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    spec = importlib.util.spec_from_file_location("score_stage", ROOT / "pipeline" / "score.py")
    assert spec is not None and spec.loader is not None
    stage = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, stage)  # dataclasses look their module up there
    spec.loader.exec_module(stage)
    with pytest.raises(FileNotFoundError) as info:
        stage.main()
    msg = str(info.value)
    assert "no trained model for made (missing data/models/made/model.pt)" in msg
    assert "`dvc repro`" in msg and "dvc repro train@made" in msg and "fvsbn" not in msg and "8bit" not in msg
    assert not (tmp_path / "data" / "scores").exists() and not (tmp_path / "data" / "metrics").exists()
    assert not (tmp_path / "store.db").exists(), "failed before opening an MLflow run"


# --------------------------------------------------------------------- unreachable tracking server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_tracking_server_fails_fast_without_falling_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    entered = False
    t0 = time.perf_counter()
    with pytest.raises(TrackingUnavailableError) as info:
        with stage_run("train@made", TrackingParams(), params={"x": 1}, root=tmp_path):
            entered = True
    seconds = time.perf_counter() - t0
    msg = str(info.value)
    assert not entered, "the stage's work must not start"
    assert seconds < 5, f"took {seconds:.1f} s"
    assert f"{uri} (from MLFLOW_TRACKING_URI) is unreachable" in msg and "Connection refused" in msg
    assert "mlflow server" in msg and "unset MLFLOW_TRACKING_URI" in msg
    assert not list(tmp_path.iterdir()), "no local store as a silent fallback"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(
        TrackingUnavailableError, match=r"from tracking.uri in params.yaml.*tracking.uri: null"
    ):
        with stage_run("score", TrackingParams(uri=uri), params={}, root=tmp_path):
            pass
    assert isinstance(info.value, RuntimeError)


@pytest.fixture
def http_server() -> Iterator[tuple[str, dict[str, int]]]:
    """A local HTTP server whose /health answers with ``state["status"]``."""
    state = {"status": 200}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(state["status"] if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_tracking_server_check_passes_a_live_server_and_times_out_a_silent_one(
    http_server: tuple[str, dict[str, int]],
) -> None:
    uri, state = http_server
    check_tracking_server(uri)
    check_tracking_server(uri + "/")
    state["status"] = 401  # behind an auth proxy: reachable, MLflow reports auth errors itself
    check_tracking_server(uri)
    state["status"] = 503
    with pytest.raises(TrackingUnavailableError, match="answered HTTP 503"):
        check_tracking_server(uri)
    check_tracking_server("sqlite:///nowhere/mlflow.db")  # local stores are not servers

    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        t0 = time.perf_counter()
        with pytest.raises(TrackingUnavailableError, match=r"no answer within 0.5 s"):
            check_tracking_server(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        assert time.perf_counter() - t0 < 3


def test_mlflow_http_retries_are_bounded_unless_set_by_the_user() -> None:
    env: dict[str, str] = {}
    bound_mlflow_http_retries(env)
    assert env == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "9"}
    bound_mlflow_http_retries(env)
    assert env == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "9", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    assert {"MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"} <= set(os.environ)  # on import


# --------------------------------------------------------------------- checkpoints load weights only


class Payload:
    """Unpickling this would create a file: what an attacker's checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_checkpoints_load_weights_only_and_pickled_objects_are_refused(tmp_path: Path) -> None:
    with pytest.raises(Interrupted):
        train_run("made", PARAMS, tmp_path, stop_after=2)
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["epoch"] == last["epoch"] == 2 and last["run"]["arch"] == "made"
    assert load_model(tmp_path / "best.pt").name == "made"

    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({**best, "extra": Payload(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(evil)
    assert not marker.exists(), "the payload must not run"


def test_the_referenced_fault_tests_exist() -> None:
    """The table above points at tests in other files: keep it honest."""
    for match in re.finditer(r"tests/(test_\w+\.py) \(([^)]*)\)", __doc__ or ""):
        source = (ROOT / "tests" / match.group(1)).read_text()
        for name in re.findall(r"``(test_\w+)``", match.group(2)):
            assert f"def {name}(" in source, f"{match.group(1)} has no {name}"
