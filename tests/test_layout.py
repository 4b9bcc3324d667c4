"""layout.py and dvc.yaml name the same pipeline paths: neither can gain, lose or rename one alone."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import yaml

from ardetect import layout

ROOT = Path(__file__).resolve().parents[1]
NAME = "{name}"  # dvc.yaml's ${item}, ${adaptive.model}, ... and layout's name arguments, made comparable


def _dvc_paths(dvc: dict[str, Any]) -> set[str]:
    """Every data path a stage depends on or writes (deps, outs, metrics, plots), templates normalised."""
    out: set[str] = set()
    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        for key in ("deps", "outs", "metrics", "plots"):
            for entry in body.get(key, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                if not path.startswith(("pipeline/", "src/")):
                    out.add(re.sub(r"\$\{[^}]+\}", NAME, path))
    return out


def _layout_paths() -> set[str]:
    """layout's Path constants and its one-argument functions called with the placeholder name."""
    paths = {v for v in vars(layout).values() if isinstance(v, Path)}
    for name, f in vars(layout).items():
        if not (inspect.isfunction(f) and f.__module__ == layout.__name__) or name.startswith("split"):
            continue
        if inspect.signature(f).return_annotation in (Path, "Path"):  # path builders, not file listings
            paths.add(f(NAME))
    return {p.as_posix() for p in paths}


def _inside_any(path: str, outs: set[str]) -> bool:
    return any(path.startswith(o + "/") for o in outs)


def test_every_dvc_path_is_named_in_layout() -> None:
    missing = _dvc_paths(yaml.safe_load((ROOT / "dvc.yaml").read_text())) - _layout_paths()
    assert not missing, f"dvc.yaml paths with no name in src/ardetect/layout.py: {sorted(missing)}"


def test_every_layout_path_is_in_dvc_yaml_or_inside_an_output() -> None:
    """A layout path is a DVC path, inside one (data/scores/scores.parquet), a folder of them
    (data/metrics), or (inside) one listed in ``NOT_IN_DVC``; and nothing listed there may be a DVC path
    (a stage that gained it must say so)."""
    dvc = _dvc_paths(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    untracked = {p.as_posix() for p in layout.NOT_IN_DVC}
    stray = {
        p
        for p in _layout_paths() - dvc - untracked
        if not _inside_any(p, dvc | untracked) and not any(d.startswith(p + "/") for d in dvc)
    }
    assert not stray, f"layout paths that no dvc.yaml stage names: {sorted(stray)}"
    tracked = untracked & dvc
    assert not tracked, f"layout.NOT_IN_DVC names paths that dvc.yaml now tracks: {sorted(tracked)}"


def test_the_check_catches_a_renamed_output() -> None:
    """A path renamed in dvc.yaml only (or a new stage output) is reported."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dvc["stages"]["detect"]["outs"][0] = "data/detections"
    assert "data/detections" in _dvc_paths(dvc) - _layout_paths()
    train_outs = dvc["stages"]["train"]["do"]["outs"]
    assert f"data/models/{NAME}" in _dvc_paths(dvc) and f"data/models/{NAME}" in _layout_paths()
    train_outs[0] = "data/model/${item}"
    assert f"data/model/{NAME}" in _dvc_paths(dvc) - _layout_paths()


def test_layout_imports_only_pathlib() -> None:
    """Every stage imports layout: anything it imported would join every stage's DVC deps."""
    imports = [ln for ln in inspect.getsource(layout).splitlines() if ln.startswith(("import ", "from "))]
    assert imports == ["from __future__ import annotations", "from pathlib import Path"]
