"""MLflow: one run per DVC stage, all stage runs of one pipeline execution under one parent run.

A pipeline execution is identified by the ``dvc repro`` / ``dvc exp run`` process that launched the
stage (found by walking up the process tree), so every stage that one command runs shares a parent,
and the MLflow UI compares pipeline executions side by side. ``ARDETECT_PIPELINE_ID`` overrides it.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri`` in params.yaml, else a SQLite
store ``mlflow.db`` in the repository root with artifacts in ``mlartifacts/`` (the original repository
also for queued experiments, which DVC runs in temporary copies). A tracking *server*
(an http(s) URI) is checked before the stage does any work: when it does not answer, the stage fails
within seconds with ``TrackingUnavailableError``; it never falls back to another store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import time
import urllib.parse
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ardetect.configs import config_dataclass

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no phoning home from an offline pipeline


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


def git_tags(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(status)).lower()}


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

        mlflow.log_metrics(dict(metrics))
        client = mlflow.MlflowClient()
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            client.log_metric(self.parent_id, f"{prefix}/{k}", float(v), timestamp=ts)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        import mlflow

        mlflow.log_figure(figure, name)

    def log_torch_model(self, model: Any, name: str = "model") -> None:
        import mlflow.pytorch
        import torch

        # pickle keeps the whole ARModel (log_prob, sample), not just a traced forward graph; the
        # checkpoints DVC tracks are the safe, weights-only copy.
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        mlflow.pytorch.log_model(
            model,
            name=name,
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )


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
    name = exp_name or f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}"
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    if all_params:
        for k, v in flatten(all_params).items():
            client.log_param(run.info.run_id, k, str(v)[:6000])
    return str(run.info.run_id)


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

    On an exception the run and its parent are marked FAILED and the exception propagates. An
    unreachable tracking server raises ``TrackingUnavailableError`` at once (see
    ``check_tracking_server``).
    """
    root = (root or Path.cwd()).resolve()
    uri = tracking_uri(tracking, store_root(root))
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri in params.yaml"
    check_tracking_server(uri, source=source)  # fail fast, before importing mlflow or any work

    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(tracking.experiment, uri, store_root(root))
    parent_id = _parent_run(experiment_id, root, all_params)
    tags = {
        "mlflow.parentRunId": parent_id,
        "dvc.stage": stage,
        **git_tags(root),
        **file_hashes([p for p in inputs or [] if p.exists()]),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    client = mlflow.MlflowClient()
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags) as run:
        handle = StageRun(run.info.run_id, parent_id, stage)
        handle.log_params(params)
        try:
            yield handle
        except BaseException:
            client.set_terminated(parent_id, status="FAILED")
            raise
    client.set_terminated(parent_id, status="FINISHED")
