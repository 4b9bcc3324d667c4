"""MLflow: one run per DVC stage, all stage runs of one pipeline execution under one parent run.

A pipeline execution is identified by the ``dvc repro`` / ``dvc exp run`` process that launched the
stage (found by walking up the process tree), so every stage that one command runs shares a parent,
and the MLflow UI compares pipeline executions side by side. ``ARDETECT_PIPELINE_ID`` overrides it.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri`` in params.yaml, else a SQLite
store ``mlflow.db`` in the repository root with artifacts in ``mlartifacts/`` (the original repository
also for queued experiments, which DVC runs in temporary copies). A tracking *server*
(an http(s) URI) is checked before the stage does any work: when it does not answer, the stage fails
within seconds with ``TrackingUnavailableError``; it never falls back to another store.

Each stage run also records, the way MLflow's UI shows them: its data dependencies as datasets (the
Dataset column; digest = DVC's md5 of the dep), system metrics (CPU, memory, disk, GPU every 2 s; not
on a file store, whose metric files race with reads), and its process (pid, host), so that the next
start of the stage can mark a run whose process was SIGKILLed as KILLED (it would stay RUNNING forever)
and remove the temporary files it left. SIGTERM marks the run KILLED itself. ``run_stage`` turns the
known user errors into one line and exit code 2.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from ardetect.configs import ParamsError, config_dataclass
from ardetect.io import sweep_orphans

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no phoning home from an offline pipeline
# MLflow samples every 10 s by default: 2 to 18 points for a 20-s to 3-min stage is too coarse
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2")


def bound_mlflow_http_retries(environ: MutableMapping[str, str] = os.environ) -> None:
    """MLflow retries a failing request 7 times with exponential backoff (about 4 minutes), each with a
    120 s timeout: minutes of silence when a server goes away mid-stage. Bound that (3 retries, about
    15 s; 60 s timeout) unless the user set their own values."""
    environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


bound_mlflow_http_retries()


@config_dataclass
class TrackingParams:
    """``tracking`` in params.yaml."""

    uri: str | None = None
    experiment: str = "ardetect"
    log_models: bool = True


PIPELINE_TAG = "ardetect.pipeline_id"
ENV_PIPELINE_ID = "ARDETECT_PIPELINE_ID"
STAGE_TAG = "dvc.stage"
PID_TAG, HOST_TAG, PID_STARTED_TAG = "ardetect.pid", "ardetect.host", "ardetect.pid_started"


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server does not answer; the stage stops before doing any work."""


def check_tracking_server(uri: str, *, source: str = "MLFLOW_TRACKING_URI", timeout: float = 5.0) -> None:
    """Raise ``TrackingUnavailableError`` unless the http(s) tracking server ``uri`` answers ``/health``
    within ``timeout`` seconds (other URIs, e.g. ``sqlite:``, are local and not checked).

    Any HTTP answer below 500 counts as reachable (an auth proxy may refuse /health; MLflow's own
    errors are then clear enough); a refused or timed-out connection or a 5xx answer does not.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    verify: bool | str = True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        verify = False
    elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout, verify=verify)
    except requests.Timeout:
        reason = f"no answer within {timeout:g} s"
    except requests.RequestException as err:
        errno = re.search(r"\[Errno -?\d+\][^'\")]*", str(err))
        reason = errno.group(0).strip() if errno else f"{type(err).__name__}: {err}"
    else:
        if response.status_code < 500:
            return
        reason = f"GET /health answered HTTP {response.status_code}"
    unset = "unset MLFLOW_TRACKING_URI" if source == "MLFLOW_TRACKING_URI" else "set tracking.uri: null"
    where = urllib.parse.urlsplit(uri)
    raise TrackingUnavailableError(
        f"the MLflow tracking server {uri} (from {source}) is unreachable: {reason}. The stage stopped "
        f"before running. Start the server (e.g. `mlflow server --host {where.hostname or '127.0.0.1'} "
        f"--port {where.port or 5000} --backend-store-uri sqlite:///mlflow.db`), fix the URI, or {unset} "
        "to log to the local store mlflow.db."
    )


def tracking_uri(params: TrackingParams, root: Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if params.uri:
        return params.uri
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def store_root(root: Path) -> Path:
    """Where the default local store lives: the repository that launched the stage. Queued DVC
    experiments run in temporary copies of the repo; DVC sets ``DVC_ROOT`` to the original one."""
    return Path(os.environ.get("DVC_ROOT") or root).resolve()


def pipeline_identity() -> tuple[str, dict[str, str]]:
    """A key shared by all stages of one pipeline execution, and tags describing it."""
    explicit = os.environ.get(ENV_PIPELINE_ID)
    if explicit:
        return explicit, {"ardetect.launcher": ENV_PIPELINE_ID}
    me = psutil.Process()
    for proc in me.parents():
        try:
            cmd = proc.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if any(Path(word).name == "dvc" for word in cmd[:3]):  # dvc ..., python dvc ..., python -m dvc ...
            key = f"dvc-{proc.pid}-{int(proc.create_time() * 1000)}"
            return key, {"ardetect.launcher": " ".join(Path(w).name for w in cmd)[:250]}
    return f"standalone-{me.pid}-{int(me.create_time() * 1000)}", {"ardetect.launcher": "standalone"}


def _git(root: Path, *args: str) -> str:
    """``git args`` in ``root``; "" when git or the repository is missing."""
    try:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_tags(root: Path) -> dict[str, str]:
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(status)).lower()}


def pipeline_run_name(root: Path) -> str:
    """The parent run's name, what the runs table lists: the DVC experiment (``dvc exp run``), else the
    commit that ran (``<short sha>[+dirty] <subject>``), else a timestamp outside git."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    head = _git(root, "log", "-1", "--format=%h %s")
    if not head:
        return f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}"
    sha, _, subject = head.partition(" ")
    dirty = "+dirty" if _git(root, "status", "--porcelain", "--untracked-files=no") else ""
    name = f"{sha}{dirty} {subject}"
    return name if len(name) <= 100 else name[:99] + "…"


# --------------------------------------------------------------------- which process runs a stage


def process_tags() -> dict[str, str]:
    """The run's process: enough for a later start to tell whether it still runs (pid reuse included)."""
    me = psutil.Process()
    return {PID_TAG: str(me.pid), HOST_TAG: socket.gethostname(), PID_STARTED_TAG: f"{me.create_time():.2f}"}


def process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process ``process_tags`` described still runs; None when this machine cannot tell
    (another host, or a run from before these tags existed)."""
    if PID_TAG not in tags or tags.get(HOST_TAG) != socket.gethostname():
        return None
    try:
        proc = psutil.Process(int(tags[PID_TAG]))
        same = abs(proc.create_time() - float(tags.get(PID_STARTED_TAG, "nan"))) < 0.05
        return same and proc.status() != psutil.STATUS_ZOMBIE  # a zombie is dead, only not yet reaped
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's live process
        return True


def close_dead_runs(client: Any, experiment_id: str, stage: str, parent_id: str) -> tuple[list[str], int]:
    """Mark this stage's runs that are RUNNING but whose process is gone (SIGKILL, power loss) KILLED,
    with their parent pipeline run (unless it is ``parent_id``, this execution's). Returns the killed
    run ids and how many runs of the stage are alive right now (concurrent runs are left alone)."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'RUNNING'"
    )
    killed, live = [], 0
    for run in runs:
        alive = process_alive(run.data.tags)
        live += alive is True
        if alive is not False:
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        killed.append(str(run.info.run_id))
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent and parent != parent_id and client.get_run(parent).info.status == "RUNNING":
            client.set_terminated(parent, status="KILLED")
    return killed, live


# ------------------------------------------------------------------------- the stage as DVC sees it


@dataclass(frozen=True)
class DvcStage:
    """A stage's outputs (dvc.yaml) and the md5 DVC computes for its data deps."""

    outs: list[Path]
    digests: dict[str, str]  # dep path relative to the repository root -> md5 ("<md5>.dir": a folder)


def dvc_stage(root: Path, stage: str, inputs: list[Path]) -> DvcStage | None:
    """``stage`` as DVC sees it; None outside a DVC repository or for a stage dvc.yaml lacks.

    The digests of ``inputs`` are computed now, by DVC (from its state cache: cheap), not read from
    dvc.lock: during ``dvc repro`` the lock still holds the previous run's md5s, stale exactly for the
    deps whose change made the stage rerun. They equal what DVC writes to dvc.lock when the stage ends.
    """
    try:
        from dvc.dependency.param import ParamsDependency
        from dvc.repo import Repo

        wanted = {p.resolve() for p in inputs}
        with Repo(str(root)) as repo:
            (found,) = repo.stage.collect(stage)
            digests = {
                Path(dep.fs_path).resolve().relative_to(root).as_posix(): str(dep.get_hash().value)
                for dep in found.deps
                if not isinstance(dep, ParamsDependency)
                and Path(dep.fs_path).resolve() in wanted
                and os.path.exists(dep.fs_path)
            }
            return DvcStage([Path(out.fs_path) for out in found.outs], digests)
    except Exception:  # not a DVC repo, no such stage: datasets fall back to file_hashes, no sweep
        logging.getLogger(__name__).debug("no DVC stage %s in %s", stage, root, exc_info=True)
        return None


def file_hashes(paths: list[Path]) -> dict[str, str]:
    """MD5 of each input file (or of every file under a folder), as MLflow tags ``data.<path>``."""
    tags: dict[str, str] = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        h = hashlib.md5()
        for f in files:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        tags[f"data.{path.as_posix()}"] = h.hexdigest()
    return tags


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass
class StageRun:
    """The MLflow run of one stage; headline metrics are mirrored on the pipeline's parent run."""

    run_id: str
    parent_id: str
    stage: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        flat = flatten(params)
        mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics(dict(metrics), step=step)

    def log_headline(self, metrics: Mapping[str, float], prefix: str) -> None:
        """Final metrics on this run, and on the parent as ``<prefix>/<name>`` for side-by-side views."""
        import mlflow
        from mlflow.entities import Metric

        mlflow.log_metrics(dict(metrics))
        ts = int(time.time() * 1000)
        mirrored = [Metric(f"{prefix}/{k}", float(v), ts, 0) for k, v in metrics.items()]
        mlflow.MlflowClient().log_batch(self.parent_id, metrics=mirrored)  # one by one: ~5 ms a metric

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path)

    def log_torch_model(self, model: Any, name: str | None = None) -> None:
        """Log ``model`` as MLflow model ``name`` (default: ``made`` for stage ``train@made``, else the
        stage's name) with a signature and an input example: two seeded images, as integer levels for a
        density model (it has ``levels``) or gray values in [0, 1] for the classifier, and what
        ``forward`` returns for them (logits; what pyfunc ``predict`` gives)."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        g = torch.Generator().manual_seed(0)
        shape = (2, *model.image_shape)
        levels = getattr(model, "levels", None)
        example = (  # (2, C, H, W)
            torch.randint(0, levels, shape, generator=g, dtype=torch.uint8)
            if levels
            else torch.rand(shape, generator=g)
        )
        training = model.training
        model.eval()
        described: dict[str, Any] = {}
        if not getattr(model, "num_classes", 0):  # pyfunc passes one input: a p(x | y) model has two
            with torch.no_grad():
                logits = model(example)  # (2, C, H, W) Bernoulli, (2, levels, C, H, W), or (2, classes)
            signature = infer_signature(example.numpy(), logits.float().numpy())
            described = {"signature": signature, "input_example": example.numpy()}
        model.train(training)
        # pickle keeps the whole ARModel (log_prob, sample), not just a traced forward graph; the
        # checkpoints DVC tracks are the safe, weights-only copy.
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        mlflow.pytorch.log_model(
            model,
            name=name or self.stage.rpartition("@")[2],
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            **described,
        )


def repo_path(path: Path, root: Path) -> str:
    """``path`` (relative to the working directory) as dvc.yaml names it: relative to ``root``."""
    full = path.resolve()
    return full.relative_to(root).as_posix() if full.is_relative_to(root) else full.as_posix()


def log_datasets(digests: Mapping[str, str], context: str) -> None:
    """Each ``{path: md5}`` as an MLflow dataset of the active run (the runs table's Dataset column)."""
    import mlflow
    from mlflow.data.dataset import Dataset
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]

    # MetaDataset: metadata only (MLflow's type for data it does not load); its profile is None
    datasets: list[Dataset | None] = [
        MetaDataset(LocalArtifactDatasetSource(p), name=p, digest=md5)  # type: ignore[abstract]
        for p, md5 in digests.items()
    ]
    if datasets:
        mlflow.log_inputs(datasets, contexts=[context] * len(datasets), tags_list=[None] * len(datasets))


def _experiment_id(experiment: str, uri: str, root: Path) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return str(exp.experiment_id)
    location = (root / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
    try:
        return str(client.create_experiment(experiment, artifact_location=location))
    except Exception:  # another process created it first
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return str(found.experiment_id)


def _parent_run(experiment_id: str, root: Path, all_params: Mapping[str, Any] | None) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    key, launch_tags = pipeline_identity()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=1
    )
    if found:
        run_id = str(found[0].info.run_id)
        client.update_run(run_id, status="RUNNING")
        return run_id
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    tags = {PIPELINE_TAG: key, **launch_tags, **git_tags(root), "ardetect.kind": "pipeline"}
    if exp_name:
        tags["dvc.experiment"] = exp_name
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    run = client.create_run(experiment_id, run_name=pipeline_run_name(root), tags=tags)
    if all_params:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(all_params).items()]
        client.log_batch(run.info.run_id, params=params)  # MLflow splits it into batches of 100
    return str(run.info.run_id)


class StageTerminated(SystemExit):
    """SIGTERM reached a stage: it unwinds like an exception (outputs discarded, run marked KILLED),
    then the process exits with 128 + SIGTERM, as a killed process would, without a traceback."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise StageTerminated(128 + signum)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises ``StageTerminated`` inside the block; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def is_file_store(uri: str) -> bool:
    """MLflow's file store: a ``file:`` URI or a plain local path (no scheme, or a Windows drive)."""
    scheme = urllib.parse.urlparse(uri).scheme
    return scheme == "file" or len(scheme) <= 1


def _system_metrics_enabled(uri: str) -> bool:
    """On unless the user set MLflow's own switch ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` off, and off by
    default on a file store: its metrics are files the sampler thread creates, then appends to, so a
    ``get_run`` in the stage's own thread (``log_artifact`` calls one) that lands in between reads an empty
    file and raises "Metric 'system/...' is malformed. No data found" (seen in CI, sampling every 2 s)."""
    switch = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    if switch is None:
        return not is_file_store(uri)
    return switch.lower() not in ("false", "0")


@contextmanager
def stage_run(
    stage: str,
    tracking: TrackingParams,
    *,
    params: Mapping[str, Any],
    all_params: Mapping[str, Any] | None = None,
    inputs: list[Path] | None = None,
    root: Path | None = None,
) -> Iterator[StageRun]:
    """An MLflow run for ``stage``, child of this pipeline execution's parent run.

    On entry, earlier runs of ``stage`` whose process is gone are marked KILLED and, unless a run of
    ``stage`` is alive, the temporary files a killed run left next to the stage's outputs are removed.
    The run ends FINISHED, FAILED on an exception (which propagates), or KILLED on SIGTERM or Ctrl-C;
    its parent gets the same status. An unreachable tracking server raises
    ``TrackingUnavailableError`` at once (see ``check_tracking_server``).
    """
    root = (root or Path.cwd()).resolve()
    uri = tracking_uri(tracking, store_root(root))
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri in params.yaml"
    check_tracking_server(uri, source=source)  # fail fast, before importing mlflow or any work

    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment_id = _experiment_id(tracking.experiment, uri, store_root(root))
    parent_id = _parent_run(experiment_id, root, all_params)
    present = [p for p in inputs or [] if p.exists()]
    dvc = dvc_stage(root, stage, present)
    known = dvc.digests if dvc else {}  # DVC's md5 wherever the input is a dep of the stage (cached)
    # hash ourselves only what DVC does not: reading every input twice cost ~1.3 s per stage
    hashes = file_hashes([p for p in present if repo_path(p, root) not in known])
    digests = {
        repo_path(p, root): known.get(repo_path(p, root)) or hashes[f"data.{p.as_posix()}"] for p in present
    }
    hashes = {f"data.{p.as_posix()}": digests[repo_path(p, root)] for p in present}
    killed, live = close_dead_runs(client, experiment_id, stage, parent_id)
    swept = sweep_orphans(*dvc.outs) if dvc and not live else []
    if killed:
        print(
            f"{stage}: marked KILLED the earlier run(s) {', '.join(killed)}: their process is gone",
            file=sys.stderr,
        )
    if swept:
        print(
            f"{stage}: removed what a killed run left: {', '.join(repo_path(p, root) for p in swept)}",
            file=sys.stderr,
        )
    tags = {"mlflow.parentRunId": parent_id, STAGE_TAG: stage, **git_tags(root), **hashes, **process_tags()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=stage,
        tags=tags,
        log_system_metrics=_system_metrics_enabled(uri),
    )
    status = "FAILED"
    try:
        handle = StageRun(run.info.run_id, parent_id, stage)
        handle.log_params(params)
        log_datasets(digests, context=stage.partition("@")[0])
        with _sigterm_unwinds():
            yield handle
        status = "FINISHED"
    except (StageTerminated, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)
        client.set_terminated(parent_id, status=status)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the user must act (fix params.yaml, run an earlier stage, start the
    tracking server, lower a learning rate), each raised with a message that says how. Types of modules
    the stage never imported cannot have been raised, so they are looked up, not imported: the import
    closure of tracking, and so every stage's DVC deps, stays narrow."""
    known: list[type[BaseException]] = [ParamsError, TrackingUnavailableError, FileNotFoundError]
    for module, name in (("ardetect.data", "DataError"), ("ardetect.loop", "NonFiniteLossError")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            known.append(getattr(loaded, name))
    return tuple(known)


def run_stage(main: Callable[..., None], *args: str) -> None:
    """Run a stage's ``main``: a known user error prints ``error: <message>`` and exits with 2, without
    a traceback that would bury the message; any other exception keeps its traceback."""
    try:
        main(*args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
