"""The whole pipeline of a params profile in one command, timed: every stage of dvc.yaml, in dependency
order, each as the process `dvc repro` would start, in a scratch folder; then one JSON with the wall time,
each stage's seconds and each model's test NLL / BPD and training throughput.

Needs neither DVC nor a DVC repository (a bare GPU machine has no DVC): the stage list, the `foreach`
expansion and the order come from dvc.yaml and the profile here. MLflow logs to a file store in the scratch
folder (`mlruns/`: it needs no SQLAlchemy, so mlflow-skinny suffices; no system metrics there, see
`ardetect.tracking`) unless MLFLOW_TRACKING_URI says otherwise. The JSON is rewritten after every stage,
and a failed stage, the --deadline-seconds or SIGTERM stop the run with what it has (`"complete": false`).

    python benchmarks/gpu_pipeline.py --profile profiles/gpu.yaml --data-root DIR_WITH_IDX_FILES \\
        --deadline-seconds 540 --out benchmarks/results/gpu-h200-pipeline.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
GRACE_SECONDS = 15.0  # SIGTERM first (the stage marks its MLflow run KILLED and cleans up), then SIGKILL
_REF = re.compile(r"\$\{([\w.]+)\}")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml with its interpolations filled in (``train@<model>`` for each foreach item)."""

    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]


def lookup(params: Mapping[str, Any], ref: str) -> Any:
    node: Any = params
    for part in ref.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"dvc.yaml interpolates ${{{ref}}}, which the profile does not set")
        node = node[part]
    return node


def interpolate(text: str, params: Mapping[str, Any], item: str | None = None) -> str:
    return _REF.sub(
        lambda m: item if m.group(1) == "item" and item else str(lookup(params, m.group(1))), text
    )


def _paths(entries: list[Any] | None) -> list[str]:
    """The paths of a deps/outs/metrics/plots list (an entry is a path or ``{path: options}``)."""
    return [p for e in entries or [] for p in ([e] if isinstance(e, str) else e)]


def expand(dvc: Mapping[str, Any], params: Mapping[str, Any]) -> list[Stage]:
    """dvc.yaml's stages in file order, each ``foreach`` expanded over its list."""
    stages: list[Stage] = []
    jobs: list[tuple[str, Mapping[str, Any], str | None]]
    for name, spec in dvc["stages"].items():
        if "foreach" in spec:
            items = spec["foreach"]
            if isinstance(items, str):  # foreach: ${train.models}
                ref = _REF.fullmatch(items)
                if ref is None:
                    raise ValueError(f"stage {name}: foreach {items!r} is not one ${{...}} reference")
                items = lookup(params, ref.group(1))
            jobs = [(f"{name}@{item}", spec["do"], str(item)) for item in items]
        else:
            jobs = [(name, spec, None)]
        for stage_name, body, item in jobs:
            outs = [*_paths(body.get("outs")), *_paths(body.get("metrics")), *_paths(body.get("plots"))]
            stages.append(
                Stage(
                    stage_name,
                    interpolate(body["cmd"], params, item),
                    tuple(interpolate(p, params, item) for p in _paths(body.get("deps"))),
                    tuple(interpolate(p, params, item) for p in outs),
                )
            )
    return stages


def _overlap(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    return pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa)


def order(stages: list[Stage]) -> list[Stage]:
    """A topological order (a stage after every stage whose outputs it reads), ties in dvc.yaml's order:
    dvc.yaml lists `report` before `ood` and `compress`, whose outputs it reads."""
    after = {
        s.name: {t.name for t in stages if t is not s and any(_overlap(d, o) for d in s.deps for o in t.outs)}
        for s in stages
    }
    done: list[Stage] = []
    while len(done) < len(stages):
        names = {s.name for s in done}
        ready = [s for s in stages if s.name not in names and after[s.name] <= names]
        if not ready:
            raise ValueError(f"dvc.yaml has a cycle among {sorted(set(after) - names)}")
        done.append(ready[0])
    return done


def scratch_project(workdir: Path, profile: Path, data_root: Path | None) -> dict[str, Any]:
    """``workdir`` as a project root for the stage scripts: pipeline/, dvc.yaml and the profile as
    params.yaml (``data.root`` set to ``data_root`` when given). Returns the params."""
    params = yaml.safe_load(profile.read_text())
    if data_root is not None:
        params["data"]["root"] = str(data_root.resolve())
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "pipeline", workdir / "pipeline", dirs_exist_ok=True)
    shutil.copy2(ROOT / "dvc.yaml", workdir / "dvc.yaml")
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dict(params)


class Stopped(Exception):
    """SIGTERM reached the runner: the stage in progress is stopped and the JSON written."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(f"signal {signum}")


@contextmanager
def sigterm_stops() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the stage's process group (its workers too), then SIGKILL to whatever is left of it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=GRACE_SECONDS)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_stage(
    stage: Stage, workdir: Path, env: Mapping[str, str], log: Path, timeout: float
) -> dict[str, Any]:
    """Run one stage in ``workdir`` (output to ``log``); its seconds, exit code and status."""
    words = shlex.split(stage.cmd)
    if words[0] in ("python", "python3"):
        words[0] = sys.executable
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            words, cwd=workdir, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=max(timeout, 0.001))
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            stop(proc)
            code, status = proc.returncode, "timeout"
        except BaseException:  # Stopped, KeyboardInterrupt: the stage must not outlive the runner
            stop(proc)
            raise
    return {"status": status, "returncode": code, "seconds": time.perf_counter() - started}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def model_rows(params: Mapping[str, Any], workdir: Path, stages: Mapping[str, Any]) -> dict[str, Any]:
    """Per trained model: its levels, budget and what its ``train@`` stage published."""
    defaults = params["train"]["defaults"]
    rows: dict[str, Any] = {}
    for name in params["train"]["models"]:
        entry = params["models"][name]
        train = {**defaults, **(entry.get("train") or {})}
        row: dict[str, Any] = {
            "arch": entry["arch"],
            "levels": entry.get("levels", 2),
            "background": (entry.get("mutation_rate") or 0) > 0,
            "conditional": bool(entry.get("conditional", False)),
            "max_minutes": train.get("max_minutes"),
            "stage_seconds": stages.get(f"train@{name}", {}).get("seconds"),
        }
        metrics_path = workdir / "data/metrics/train" / f"{name}.json"
        if metrics_path.is_file():
            m = json.loads(metrics_path.read_text())
            row.update(
                test_nll=m["test_nll"],
                test_bpd=m["test_bpd"],
                train_images_per_second=m["train_images_per_second"],
                train_seconds=m["train_seconds"],
                epochs_run=m.get("epochs_run"),
                best_epoch=m.get("best_epoch"),
            )
        rows[name] = row
    return rows


def best(rows: Mapping[str, Any], levels: int, key: str) -> tuple[str | None, float | None]:
    """The lowest ``key`` among the trained detectors with ``levels`` (background models left out)."""
    found = [
        (v, name)
        for name, row in rows.items()
        if row["levels"] == levels and not row["background"] and (v := _finite(row.get(key))) is not None
    ]
    return (min(found)[1], min(found)[0]) if found else (None, None)


def device_info() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "cpu_threads": os.cpu_count(),
    }


def write_json(path: Path, result: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, default=ROOT / "profiles/gpu.yaml", help="params file to run")
    ap.add_argument("--data-root", type=Path, help="folder with the IDX files (sets data.root)")
    ap.add_argument("--workdir", type=Path, help="scratch project folder (default: a new temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu-h200-pipeline.json")
    ap.add_argument("--logs", type=Path, help="one log per stage (default: WORKDIR/logs)")
    ap.add_argument("--deadline-seconds", type=float, default=math.inf, help="stop the run after this")
    ap.add_argument("--keep", type=Path, help="copy data/metrics and data/report/report.md here at the end")
    args = ap.parse_args(argv)

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="ardetect-pipeline-"))).resolve()
    if workdir.exists() and any(workdir.iterdir()):  # a train stage would resume from its checkpoints/
        ap.error(f"--workdir {workdir} is not empty")
    logs = (args.logs or workdir / "logs").resolve()
    params = scratch_project(workdir, args.profile, args.data_root)
    stages = order(expand(yaml.safe_load((ROOT / "dvc.yaml").read_text()), params))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
        "ARDETECT_PIPELINE_ID": f"gpu-pipeline-{os.getpid()}-{int(time.time())}",  # one MLflow parent run
    }
    env.setdefault("GIT_PYTHON_REFRESH", "quiet")  # Foolbox imports GitPython: no git binary is no error
    if not env.get("MLFLOW_TRACKING_URI"):
        env.update(MLFLOW_TRACKING_URI=(workdir / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true")
    result: dict[str, Any] = {
        "complete": False,
        "stopped": None,
        "profile": str(args.profile),
        **device_info(),
        "deadline_seconds": args.deadline_seconds if math.isfinite(args.deadline_seconds) else None,
        "workdir": str(workdir),
        "tracking_uri": env["MLFLOW_TRACKING_URI"],
        "stage_order": [s.name for s in stages],
        "full_pipeline_seconds": None,
        "stages": {},
    }
    t0 = time.perf_counter()  # the pipeline's clock: after this process's own start (torch import)
    print(f"{len(stages)} stages in {workdir}, logs in {logs}", flush=True)

    def record() -> None:
        rows = model_rows(params, workdir, result["stages"])
        result["full_pipeline_seconds"] = time.perf_counter() - t0
        result["train_seconds_total"] = sum(r["stage_seconds"] or 0.0 for r in rows.values())
        result["best_8bit_model"], result["best_8bit_test_bpd"] = best(rows, 256, "test_bpd")
        result["best_binary_model"], result["best_binary_test_nll"] = best(rows, 2, "test_nll")
        result["models"] = rows
        write_json(args.out, result)

    try:
        with sigterm_stops():
            for stage in stages:
                left = args.deadline_seconds - (time.perf_counter() - t0)
                if left <= 0:
                    result["stopped"] = f"deadline before {stage.name}"
                    break
                log = logs / f"{stage.name.replace('@', '-')}.log"
                row = run_stage(stage, workdir, env, log, left)
                result["stages"][stage.name] = row
                print(f"{stage.name:>32}: {row['status']:>7} {row['seconds']:7.1f} s", flush=True)
                record()
                if row["status"] != "ok":
                    result["stopped"] = f"{row['status']}: {stage.name}"
                    tail = log.read_text(errors="replace").splitlines()[-40:]
                    print("\n".join(f"  | {line}" for line in tail), flush=True)
                    break
            else:
                result["complete"] = True
    except (Stopped, KeyboardInterrupt) as err:
        result["stopped"] = f"interrupted ({err or 'Ctrl-C'})"
    record()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        if (workdir / "data/metrics").is_dir():
            shutil.copytree(workdir / "data/metrics", args.keep / "metrics", dirs_exist_ok=True)
        if (workdir / "data/report/report.md").is_file():
            shutil.copy2(workdir / "data/report/report.md", args.keep / "report.md")
    print(
        f"{'complete' if result['complete'] else 'INCOMPLETE (' + str(result['stopped']) + ')'} in "
        f"{result['full_pipeline_seconds']:.1f} s; best 8-bit {result['best_8bit_test_bpd']} bpd "
        f"({result['best_8bit_model']}), best binary {result['best_binary_test_nll']} nats "
        f"({result['best_binary_model']}) -> {args.out}",
        flush=True,
    )
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
