"""Bits per dimension of gray images under a trained density model.

``BPD(x) = -log p(x) / (C*H*W*ln 2)``. How a gray image (uint8 levels, or floats in [0, 1] = gray/255)
meets the model depends on the model's levels:

* binary models (``levels == 2``) with ``"static"`` binarization: the BPD of the thresholded image
  ``gray/255 > threshold`` (0.5 unless the data were binarised with another; standard error 0);
* binary models with ``"dynamic"`` binarization: the expected BPD over Bernoulli images with
  ``p = gray/255``, estimated from ``num_draws`` seeded draws, with its Monte-Carlo standard error
  ``std(ddof=1) / sqrt(num_draws)``. Row ``i``'s draws come from a generator seeded with ``(seed, i)``,
  so a score depends neither on the batch size nor on the other images in the batch;
* 8-bit models (``levels == 256``): the exact BPD of the uint8 image (``binarization`` must be ``None``;
  standard error 0).

Under ``torchrun``, :func:`score_table` shares each model's work out by whole batches: the batches of
every set, one after the other, are cut into one contiguous range per rank (``Ranks.shard_range``), each
rank scores its batches (each the very batch one process scores, with the same row seeds), and the
parts are gathered in order, so the table is one process's, bit for bit (with the same threads per
process).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import Tensor
from tqdm.auto import tqdm

from ardetect.conditional import SURPRISE_PIXELS, class_scores, conditional_scores
from ardetect.configs import Device, config_dataclass
from ardetect.distributed import Ranks
from ardetect.models.base import ARModel

Binarization = Literal["static", "dynamic"] | None
ArrayLike = np.ndarray | Tensor


@config_dataclass
class ScoreConfig:
    """Monte-Carlo draws for dynamic binarization (at least 2, for a standard error) and batching.

    ``batch_size`` counts model rows per forward pass: images for static/8-bit scoring, images × draws
    for dynamic scoring, so memory stays bounded whatever ``num_draws`` is.
    """

    num_draws: Annotated[int, Field(ge=2)] = 8
    seed: NonNegativeInt = 0
    batch_size: PositiveInt = 512
    surprise_pixels: PositiveInt = SURPRISE_PIXELS  # class-conditional models: pixels in the surprise score


@config_dataclass
class ScoreParams(ScoreConfig):
    """``score`` in params.yaml: which clean images are scored next to the adversarial ones."""

    num_test: PositiveInt = 500  # first N clean test images (plus every attacked original)
    num_calib: PositiveInt = 1000  # clean test images, disjoint from the evaluated: fix the threshold
    num_train_ref: PositiveInt = 500  # training images: the reference distribution for p-values
    device: Device = "auto"
    progress: bool = True


def gray_to_unit(gray: ArrayLike, image_shape: tuple[int, ...]) -> Tensor:
    """Validate gray images (N, C, H, W) for a model of ``image_shape``; return floats in [0, 1] (CPU)."""
    x = torch.as_tensor(gray)
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got an array of shape {tuple(x.shape)}")
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"model trained on shape {tuple(image_shape)}, got {tuple(x.shape[1:])}")
    if x.dtype == torch.bool:
        raise TypeError("images must be uint8 gray levels or floats in [0, 1], got bool")
    if x.is_floating_point():
        if x.numel() and not (x.min() >= 0 and x.max() <= 1):  # also rejects NaN
            raise ValueError(
                f"float images must lie in [0, 1] (gray/255), got values in "
                f"[{x.min().item():g}, {x.max().item():g}]"
            )
        return x.float().cpu()
    if x.dtype != torch.uint8:
        if x.numel() and (x.min() < 0 or x.max() > 255):
            raise ValueError(
                "integer images must be gray levels in [0, 255], "
                f"got values in [{x.min().item()}, {x.max().item()}]"
            )
    return x.cpu().float() / 255.0


def levels_for_256(p: Tensor) -> Tensor:
    levels = p * 255.0
    rounded = levels.round()
    if levels.numel() and (levels - rounded).abs().max() > 1e-3:
        raise ValueError("float images scored by a 256-level model must be multiples of 1/255 (gray/255)")
    return rounded


@torch.inference_mode()
def score_bpd(
    model: ARModel,
    gray: ArrayLike,
    binarization: Binarization,
    config: ScoreConfig,
    device: torch.device | str = "cpu",
    progress: bool = True,
    threshold: float = 0.5,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BPD of each image and its standard error, two float64 arrays of shape (N,).

    ``gray``: uint8 gray levels (N, C, H, W), or floats in [0, 1]; ``binarization`` as in the module
    docstring (``threshold`` is the static binarisation's, as in training). ``config.batch_size`` model
    rows (images × draws for dynamic) go through the model at once. ``rows``: the row number that seeds
    each image's draws (default ``arange(N)``); all zeros score every image as if it came alone.
    """
    if model.levels == 2 and binarization not in ("static", "dynamic"):
        raise ValueError(
            f"a binary model (levels=2) needs binarization 'static' or 'dynamic', got {binarization!r}"
        )
    if model.levels != 2 and binarization is not None:
        raise ValueError(
            f"a {model.levels}-level model scores gray images exactly; binarization must be None, "
            f"got {binarization!r}"
        )
    p_all = gray_to_unit(gray, model.image_shape)  # (N, C, H, W) in [0, 1]
    device = torch.device(device)
    model = model.to(device).eval()
    n, s = len(p_all), config.num_draws
    row_ids = np.arange(n) if rows is None else np.asarray(rows)
    if row_ids.shape != (n,):
        raise ValueError(f"rows must give one row number per image ({n}), got shape {row_ids.shape}")
    mean, se = np.zeros(n), np.zeros(n)
    per_batch = max(1, config.batch_size // s) if binarization == "dynamic" else config.batch_size
    for i in tqdm(range(0, n, per_batch), desc="bpd", leave=False, disable=not progress):
        p = p_all[i : i + per_batch]  # (B, C, H, W)
        if model.levels != 2:
            mean[i : i + len(p)] = model.bpd(levels_for_256(p).to(device)).double().cpu().numpy()
        elif binarization == "static":
            mean[i : i + len(p)] = model.bpd((p > threshold).float().to(device)).double().cpu().numpy()
        else:
            gens = [
                torch.Generator().manual_seed(_row_seed(config.seed, int(row_ids[i + j])))
                for j in range(len(p))
            ]
            u = torch.stack(
                [torch.rand((s, *p.shape[1:]), generator=g) for g in gens], dim=1
            )  # (S, B, C, H, W)
            draws = (u < p).float()  # (S, B, C, H, W)
            bpd = model.bpd(draws.flatten(0, 1).to(device)).double().cpu().view(s, len(p))  # (S, B)
            mean[i : i + len(p)] = bpd.mean(0).numpy()
            se[i : i + len(p)] = (bpd.std(0, unbiased=True) / math.sqrt(s)).numpy()
    return mean, se


def _row_seed(seed: int, row: int) -> int:
    """A distinct 63-bit seed per (seed, row) pair."""
    return (seed * 1_000_003 + row) % (2**63 - 1)


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images to score, with the columns of the score table that describe them (one value per image)."""

    source: str  # train_ref | val | test | adversarial
    images: np.ndarray  # (N, C, H, W) uint8
    image_id: np.ndarray  # (N,) index into the clean split (adversarial: the attacked test image)
    label: np.ndarray
    prediction: np.ndarray
    attack: str | None = None
    epsilon: float | None = None
    success: np.ndarray | None = None


def score_table(
    models: dict[str, tuple[ARModel, Binarization]],
    sets: list[ImageSet],
    config: ScoreConfig,
    device: torch.device | str = "cpu",
    progress: bool = True,
    threshold: float = 0.5,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """The tidy score table (one row per model × image) and each model's scoring images/second.

    Under ``torch.distributed`` every rank calls it with the same arguments, scores its range of each
    model's batches and gets the whole table (module docstring); only rank 0 shows progress."""
    frames, speed = [], {}
    for name, (model, _) in models.items():
        for s in sets:  # shape errors before any scoring work
            if tuple(s.images.shape[1:]) != model.image_shape:
                raise ValueError(
                    f"model {name!r} was trained on images of shape {model.image_shape}, but the "
                    f"{s.source} set {s.attack or ''} has shape {tuple(s.images.shape[1:])}"
                )
    ranks = Ranks.current()
    for name, (model, binarization) in models.items():
        start, count = time.perf_counter(), sum(len(s.images) for s in sets)
        if model.num_classes and model.levels != 256:
            raise ValueError(f"{model.name}: only 8-bit class-conditional models are scored")
        step = batch_rows(model, binarization, config)
        batches = [(k, i) for k, s in enumerate(sets) for i in range(0, len(s.images), step)]
        share = ranks.shard_range(len(batches))  # this rank's batches: a contiguous range of them all
        mine = batches[share.start : share.stop]
        show = progress and ranks.lead
        parts = [
            (k, raw_scores(model, binarization, sets[k], i, i + step, config, device, threshold))
            for k, i in tqdm(mine, desc=f"score {name}", disable=not show)
        ]
        parts = ranks.gather_rows(parts)  # every rank's batches, in order: one process's
        for k, s in enumerate(sets):
            raw = [part for j, part in parts if j == k] or [
                raw_scores(model, binarization, s, 0, 0, config, device, threshold)  # an empty set
            ]
            scores = finish_scores(model, s, tuple(np.concatenate(a) for a in zip(*raw)))
            frames += [_frame(s, name + suffix, bpd, se) for suffix, (bpd, se) in scores.items()]
        speed[name] = count / max(time.perf_counter() - start, 1e-9)
    return pd.concat(frames, ignore_index=True), speed


def batch_rows(model: ARModel, binarization: Binarization, config: ScoreConfig) -> int:
    """Images per forward pass when scoring with ``model``: :func:`score_bpd`'s batches, or for a
    class-conditional model ``conditional.class_scores``' (``config.batch_size`` rows each)."""
    if model.num_classes:
        return max(1, config.batch_size // model.num_classes)
    return max(1, config.batch_size // config.num_draws) if binarization == "dynamic" else config.batch_size


def raw_scores(
    model: ARModel,
    binarization: Binarization,
    s: ImageSet,
    lo: int,
    hi: int,
    config: ScoreConfig,
    device: torch.device | str,
    threshold: float,
) -> tuple[np.ndarray, ...]:
    """What ``model`` computes for the set's images ``lo:hi`` (row numbers seed the draws as in the
    whole set): (BPD, standard error), each (n,), or a class-conditional model's (n, K) class
    log-likelihoods and surprises (``conditional.class_scores``). Batches start at ``lo``: with ``lo`` a
    multiple of :func:`batch_rows`, they are the whole set's batches."""
    if not model.num_classes:
        rows = np.arange(lo, min(hi, len(s.images)))
        return score_bpd(model, s.images[lo:hi], binarization, config, device, False, threshold, rows=rows)
    levels = levels_for_256(gray_to_unit(s.images[lo:hi], model.image_shape))  # (n, C, H, W)
    return class_scores(model, levels, config.batch_size, device, config.surprise_pixels)  # 2 × (n, K)


def finish_scores(
    model: ARModel, s: ImageSet, raw: tuple[np.ndarray, ...]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BPD and standard error of the set's images, from the whole set's :func:`raw_scores`, keyed by
    model-name suffix: ``""`` alone, or for a class-conditional model its marginal, ``-pred``,
    ``-disagree`` and ``-surprise`` scores (``ardetect.conditional``; exact, standard error 0)."""
    if not model.num_classes:
        bpd, se = raw
        return {"": (bpd, se)}
    per_class, surprise = raw
    zero = np.zeros(len(per_class))
    scores = conditional_scores(per_class, s.prediction, model.num_dims, surprise)
    return {k: (v, zero) for k, v in scores.items()}


def _frame(s: ImageSet, model: str, bpd: np.ndarray, se: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": s.image_id.astype(np.int64),
            "source": s.source,
            "attack": s.attack,
            "epsilon": np.nan if s.epsilon is None else float(s.epsilon),
            "model": model,
            "bpd": bpd,
            "bpd_se": se,
            "label": s.label.astype(np.int64),
            "prediction": s.prediction.astype(np.int64),
            "success": pd.array(s.success, dtype="boolean")
            if s.success is not None
            else pd.array([pd.NA] * len(bpd), dtype="boolean"),
        }
    )


def clean_test_pools(
    correct: np.ndarray, attacked: np.ndarray, num_test: int, num_calib: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split the clean test pool: (``test`` indices, ``calib`` indices), disjoint and sorted.

    ``test`` = the first ``num_test`` test images plus every attacked original (the paired negatives);
    ``calib`` = ``num_calib`` of the remaining test images that the classifier gets right (``correct``,
    a bool mask over the test split, as the attacked originals are), drawn with ``seed``. Thresholds set
    on ``calib`` come from the negatives' distribution but never from the images they are tested on.
    """
    n = len(correct)
    test = np.union1d(np.arange(min(num_test, n)), np.asarray(attacked, np.int64)).astype(np.int64)
    pool = np.setdiff1d(np.flatnonzero(correct), test)
    if len(pool) < num_calib:
        raise ValueError(
            f"score.num_calib = {num_calib} exceeds the {len(pool)} correctly classified test images left "
            f"after the {len(test)} evaluated ones; lower score.num_calib or score.num_test in params.yaml"
        )
    calib = np.sort(np.random.default_rng(seed).choice(pool, num_calib, replace=False)).astype(np.int64)
    return test, calib


def binarization_for(model: ARModel, mode: Literal["static", "dynamic"]) -> Binarization:
    """How ``model`` meets gray images: binary models by the training data's binarisation ``mode``
    (``binarize.mode``), 8-bit models exactly (None)."""
    return mode if model.levels == 2 else None


def load_scorers(
    paths: dict[str, Path], mode: Literal["static", "dynamic"]
) -> dict[str, tuple[ARModel, Binarization]]:
    """``{name: (model, binarization)}`` for :func:`score_table`, from published checkpoints."""
    from ardetect.models import load_model

    return {
        name: (m, binarization_for(m, mode)) for name, m in ((n, load_model(p)) for n, p in paths.items())
    }


def attack_image_sets(files: list[Path]) -> list[ImageSet]:
    """One ``adversarial`` set per attack-set file (data/attacks, data/adaptive), in ``files`` order."""
    sets = []
    for f in files:
        with np.load(f) as a:
            eps = float(a["epsilon"])
            sets.append(
                ImageSet(
                    "adversarial",
                    a["adversarial"],
                    a["source_index"],
                    a["label"],
                    a["prediction"],
                    str(a["attack"]),
                    eps if np.isfinite(eps) else None,
                    a["success"],
                )
            )
    return sets


def images_to_score(
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    predict: Callable[[np.ndarray], np.ndarray],
    attack_files: list[Path],
    params: ScoreParams,
) -> list[ImageSet]:
    """What the score stage scores: ``train_ref`` (``num_train_ref`` seeded training images), ``calib``
    and ``test`` (:func:`clean_test_pools`), then every attack set. ``predict`` is the classifier's
    label for (N, C, H, W) uint8 images (kept out of this module: scoring needs no classifier)."""
    attacked = (
        np.unique(np.concatenate([np.load(f)["source_index"] for f in attack_files]))
        if attack_files
        else np.zeros(0, np.int64)
    )
    rng = np.random.default_rng(params.seed)
    n_train = len(train["labels"])
    ref_index = np.sort(rng.choice(n_train, min(params.num_train_ref, n_train), replace=False))
    correct = predict(test["images"]) == test["labels"]
    test_index, calib_index = clean_test_pools(
        correct, attacked, params.num_test, params.num_calib, params.seed
    )

    def clean(source: str, split: dict[str, np.ndarray], index: np.ndarray) -> ImageSet:
        images = split["images"][index]  # (N, C, H, W)
        return ImageSet(source, images, index, split["labels"][index], predict(images))

    clean_sets = [
        clean("train_ref", train, ref_index),
        clean("calib", test, calib_index),
        clean("test", test, test_index),
    ]
    return clean_sets + attack_image_sets(attack_files)


def score_metrics(table: pd.DataFrame, speed: dict[str, float]) -> dict[str, dict[str, float]]:
    """data/metrics/score.json: per model, scoring speed, clean test BPD and the largest Monte-Carlo error."""
    return {
        name: {
            "images_per_second": speed[name],
            "test_bpd_mean": float(table.query("model == @name and source == 'test'")["bpd"].mean()),
            "max_bpd_se": float(table.query("model == @name")["bpd_se"].max()),
        }
        for name in speed
    }


def score_alone(
    model: ARModel,
    images: np.ndarray,
    mode: Literal["static", "dynamic"],
    threshold: float,
    config: ScoreConfig,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """BPD and standard error of (N, H, W) uint8 images, each scored as if it came alone (dynamic draws
    seeded with ``(config.seed, 0)``), so a score never depends on the other images; in batches."""
    x = images[:, None]  # (N, 1, H, W)
    rows = np.zeros(len(x), np.int64)
    return score_bpd(model, x, binarization_for(model, mode), config, device, False, threshold, rows=rows)
