"""A project built by ``dvc repro``, read back for the ``ardetect`` command: its validated params, which
trained model to use, the reference scores of the score table and the latest detection report.

Errors carry the command's exit code and read as one line: ``InputError`` (2) for bad arguments or
inputs, ``NotBuiltError`` (1) for pipeline outputs that are missing (run ``dvc repro``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ardetect import layout

if TYPE_CHECKING:
    from ardetect.params import Params

REPRO = "run `dvc repro` in the project root first"


class CliError(Exception):
    """An error reported as one line on stderr, without a traceback, and exit code ``code``."""

    code = 2


class InputError(CliError):
    """A bad argument or input file (exit code 2)."""


class NotBuiltError(CliError):
    """A pipeline output (checkpoint, score table, report) is missing (exit code 1)."""

    code = 1


def load_project_params(root: Path) -> Params:
    from ardetect.params import ParamsError, load_params

    if not (root / "params.yaml").is_file():
        raise InputError(
            f"{root / 'params.yaml'} not found; --root must be the project root (where dvc.yaml is)"
        )
    try:
        return load_params(root / "params.yaml")
    except ParamsError as err:
        raise InputError(str(err)) from None


def resolve_model(params: Params, root: Path, name: str | None = None) -> str:
    """``name`` if given, else the first 8-bit model of ``train.models`` with a checkpoint, else the first
    with a checkpoint. Background models (a likelihood ratio's reference) are no detectors."""
    from ardetect.training import detector_models

    detectors = detector_models(params.train, params.models)
    if name is not None:
        if name not in params.models:
            raise InputError(f"unknown model {name!r}; defined in params.yaml: {', '.join(params.models)}")
        if params.models[name].is_background:
            raise InputError(
                f"{name!r} is a background model (mutation_rate > 0), not a detector; "
                f"choose one of {', '.join(detectors)}"
            )
        if not (root / layout.model_path(name)).is_file():
            raise NotBuiltError(f"no checkpoint {root / layout.model_path(name)}; {REPRO}")
        return name
    trained = [n for n in detectors if (root / layout.model_path(n)).is_file()]
    if not trained:
        raise NotBuiltError(
            f"no trained checkpoint under {root / layout.MODELS} for any of train.models "
            f"({', '.join(params.train.models)}); {REPRO}"
        )
    return ([n for n in trained if params.models[n].levels == 256] or trained)[0]


def reference_scores(root: Path, model: str) -> tuple[np.ndarray, np.ndarray]:
    """The model's ``train_ref`` and ``calib`` BPDs from the score table."""
    import pandas as pd

    if not (root / layout.SCORES).is_file():
        raise NotBuiltError(f"no score table {root / layout.SCORES}; {REPRO}")
    table = pd.read_parquet(root / layout.SCORES, columns=["source", "model", "bpd"])
    rows = table[table["model"] == model]
    out = [rows.loc[rows["source"] == s, "bpd"].to_numpy(np.float64) for s in ("train_ref", "calib")]
    for source, bpd in zip(("train_ref", "calib"), out):
        if not len(bpd):
            raise NotBuiltError(
                f"the score table {root / layout.SCORES} has no {source!r} rows for model {model!r}; {REPRO}"
            )
    return out[0], out[1]


def report_summary(root: Path) -> dict[str, Any]:
    """Paths of the latest report and figures, the AUROC table, small sets and the classifier metrics."""
    from ardetect.attacksets import AttackSet
    from ardetect.detection import auroc_pivot, small_sets

    report, metrics = (
        (root / layout.REPORT / "report.md").resolve(),
        (root / layout.DETECTION_METRICS).resolve(),
    )
    for path in (report, metrics):
        if not path.is_file():
            raise NotBuiltError(f"no detection report ({path} is missing); {REPRO}")
    try:
        detection = json.loads(metrics.read_text())
    except json.JSONDecodeError as err:
        raise NotBuiltError(f"{metrics} is not valid JSON ({err}); {REPRO}") from None
    try:
        model_order = list(load_project_params(root).train.models)
    except InputError:
        model_order = []
    slugs = sorted(
        {s for sets in detection.values() for s in sets}, key=lambda s: AttackSet.from_slug(s).sort_key
    )
    classifier = root / layout.CLASSIFIER_METRICS
    return {
        "report": str(report),
        "figures": [str(p) for p in sorted(report.parent.glob("*.png"))],
        "auroc": auroc_pivot(detection, model_order, slugs),
        "small_sets": small_sets(detection),
        "classifier": json.loads(classifier.read_text()) if classifier.is_file() else None,
    }


def coding_model(params: Params, root: Path, name: str | None = None) -> str:
    """The 8-bit model that codes images: ``name`` if given, else the trained 8-bit model with the lowest
    clean test BPD in data/metrics/score.json (the shortest code), else the first of train.models."""
    from ardetect.compression import LEVELS, eight_bit_models

    if name is not None:
        name = resolve_model(params, root, name)
        if params.models[name].levels != LEVELS:
            raise InputError(f"{name!r} is a binary model; compression needs an 8-bit model (levels: 256)")
        return name
    candidates = [
        n
        for n in eight_bit_models(params.train.models, params.models)
        if (root / layout.model_path(n)).is_file()
    ]
    if not candidates:
        raise NotBuiltError(f"no trained 8-bit model (levels: 256) under {root / layout.MODELS}; {REPRO}")
    try:
        bpd = json.loads((root / layout.SCORE_METRICS).read_text())
        return min(candidates, key=lambda n: float(bpd[n]["test_bpd_mean"]))
    except (OSError, ValueError, KeyError, TypeError):
        return candidates[0]


def fpr_arg(text: str) -> float:
    """argparse type of ``--fpr``: a rate in (0, 1)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value
