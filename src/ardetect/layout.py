"""Every path the pipeline reads or writes, relative to the project root, named once.

Stage scripts, the CLI and the tests take their paths from here; dvc.yaml spells the same paths as
literals (tests/test_layout.py fails when the two drift apart). Only ``pathlib``: importing this module
adds nothing but itself to a stage's DVC deps.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
DATASET = DATA / "dataset"  # {train,val,test}.npz and info.json (stage download)
TORCHVISION_CACHE = DATA / "torchvision"  # downloads of the download stage, not a DVC output
BINARIZED = DATA / "binarized"
MODELS = DATA / "models"  # <name>/model.pt, <name>/samples.png (stage train@<name>)
CLASSIFIER_DIR = DATA / "classifier"
CLASSIFIER = CLASSIFIER_DIR / "model.pt"
ATTACKS = DATA / "attacks"  # <set>.npz, summary.csv, examples.png
ATTACK_SUMMARY = ATTACKS / "summary.csv"
ADAPTIVE = DATA / "adaptive"
SCORES_DIR = DATA / "scores"
SCORES = SCORES_DIR / "scores.parquet"
DETECT = DATA / "detect"
REPORT = DATA / "report"
OOD = DATA / "ood"
PURIFY = DATA / "purify"

METRICS = DATA / "metrics"
TRAIN_METRICS = METRICS / "train"  # <name>.json
CLASSIFIER_METRICS = METRICS / "classifier.json"
ATTACK_METRICS = METRICS / "attack.json"
ADAPTIVE_METRICS = METRICS / "adaptive.json"
SCORE_METRICS = METRICS / "score.json"
DETECTION_METRICS = METRICS / "detection.json"
OOD_METRICS = METRICS / "ood.json"
COMPRESS_METRICS = METRICS / "compress.json"
PURIFY_METRICS = METRICS / "purify.json"
HEADLINE = METRICS / "headline"  # <model>.json (stage report)

PLOTS = DATA / "plots"
TRAIN_PLOTS = PLOTS / "train"  # <name>.csv
CLASSIFIER_PLOT = PLOTS / "classifier.csv"
ROC_PLOTS = PLOTS / "roc"  # <model>.csv

CHECKPOINTS = Path("checkpoints")  # <name>/{best,last}.pt: training state, not a DVC output

# Paths above that no dvc.yaml stage names: the pipeline's scratch (downloads, training state).
NOT_IN_DVC = frozenset({TORCHVISION_CACHE, CHECKPOINTS})


def split_path(split: str) -> Path:
    """One split of the gray-level dataset: ``split`` is train, val or test."""
    return DATASET / f"{split}.npz"


def model_dir(name: str) -> Path:
    return MODELS / name


def model_path(name: str) -> Path:
    """The published checkpoint of density model ``name`` (a key under ``models`` in params.yaml)."""
    return model_dir(name) / "model.pt"


def train_metrics(name: str) -> Path:
    return TRAIN_METRICS / f"{name}.json"


def train_plot(name: str) -> Path:
    return TRAIN_PLOTS / f"{name}.csv"


def checkpoint_dir(name: str) -> Path:
    """Best and resume checkpoints of a training run in progress (a killed run resumes from here)."""
    return CHECKPOINTS / name


def attack_files(conditional: bool = True) -> list[Path]:
    """Every attack-set file, the oblivious attacks' then the adaptive ones (``conditional=False``: not
    those aimed at the class-conditional detector, ``adaptive_cond_*``)."""
    adaptive = sorted(ADAPTIVE.glob("*.npz"))
    if not conditional:
        adaptive = [f for f in adaptive if not f.name.startswith("adaptive_cond_")]
    return sorted(ATTACKS.glob("*.npz")) + adaptive
