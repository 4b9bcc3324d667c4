"""Datasets, fixed splits and binarisation.

Where the data comes from, in order: a folder named in ``params.yaml`` (``data.root``), the Debian
package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), then torchvision's canonical
download (checked against torchvision's MD5s). Every local file is verified before use: a ``.gz``
against torchvision's MD5 of the canonical archive, and its decompressed contents against the SHA-256
of the IDX file where we know it (the Debian package re-compresses the archives, so its ``.gz`` bytes
differ while the contents are identical). ``digits`` is scikit-learn's embedded 8x8 set, for tests/CI.

Images are stored as gray-level ``uint8`` arrays of shape (N, 1, H, W) with ``int64`` labels.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import NonNegativeInt, PositiveInt

from ardetect.configs import Fraction, config_dataclass

if TYPE_CHECKING:
    from torchvision.datasets import MNIST


@config_dataclass
class DataParams:
    """``data`` in params.yaml: which dataset, where to find it offline, and the seeded split."""

    dataset: Literal["mnist", "fashion-mnist", "digits"] = "fashion-mnist"
    root: str | None = None
    val_fraction: Fraction = 0.0833333  # 5,000 of Fashion-MNIST's 60,000 training images
    test_fraction: Fraction = 0.2
    seed: NonNegativeInt = 0
    max_train: PositiveInt | None = None
    max_val: PositiveInt | None = None
    max_test: PositiveInt | None = None


@config_dataclass
class BinarizeParams:
    """``binarize`` in params.yaml: static (threshold) or dynamic (Bernoulli) binarisation."""

    mode: Literal["static", "dynamic"] = "dynamic"
    threshold: Fraction = 0.5
    resample_train: bool = True
    seed: NonNegativeInt = 0


DATASET_NAMES: tuple[str, ...] = ("mnist", "fashion-mnist", "digits")
TORCHVISION_DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist")


@functools.cache
def torchvision_classes() -> dict[str, type[MNIST]]:
    """torchvision's dataset classes (their files, checksums and mirrors), imported on first use: importing
    torchvision costs some 3 s, which every stage reading the splits would otherwise pay."""
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}


DEBIAN_FOLDERS: dict[str, Path] = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
APT_PACKAGES: dict[str, str] = {"fashion-mnist": "dataset-fashion-mnist"}
#: SHA-256 of the decompressed IDX files (identical for the canonical and the Debian archives).
IDX_SHA256: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }
}
SPLITS: tuple[str, ...] = ("train", "val", "test")


class DataError(RuntimeError):
    """The data cannot be found, read or trusted; the message says which file and how to fix it."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 1, H, W) uint8 gray levels
    labels: np.ndarray  # (N,) int64

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")


@dataclass(frozen=True)
class RawDataset:
    train: Split
    test: Split | None  # None: no official test split (digits), carve one
    source: str


# ----------------------------------------------------------------------------------------- sources


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_verified(folder: Path, gz_name: str, md5: str, dataset: str) -> bytes:
    """The decompressed bytes of one IDX file in ``folder``, verified; errors name the file."""
    raw_name = gz_name.removesuffix(".gz")
    gz_path, raw_path = folder / gz_name, folder / raw_name
    known = IDX_SHA256.get(dataset, {}).get(raw_name)
    if gz_path.is_file():
        from torchvision.datasets.utils import check_integrity

        md5_ok = check_integrity(str(gz_path), md5)
        try:
            with gzip.open(gz_path, "rb") as fh:
                content = fh.read()
        except (OSError, EOFError) as err:
            raise DataError(
                f"{gz_path} is corrupted or truncated ({err}); replace it with a fresh copy "
                f"(reinstall the apt package or download it again)"
            ) from err
        if not md5_ok and known is None:
            raise DataError(
                f"{gz_path} fails torchvision's MD5 checksum ({md5}); the file is corrupted or not "
                f"the {dataset} release: replace it with a fresh copy"
            )
    elif raw_path.is_file():
        content = raw_path.read_bytes()
    else:
        raise FileNotFoundError(f"{folder} has neither {gz_name} nor {raw_name}")
    if known is not None and _sha256(content) != known:
        path = gz_path if gz_path.is_file() else raw_path
        raise DataError(
            f"{path} fails its SHA-256 checksum: the file is corrupted or truncated; replace it "
            f"with a fresh copy (reinstall the apt package or download it again)"
        )
    if known is None:
        _check_idx_structure(content, raw_path)
    return content


def _check_idx_structure(content: bytes, path: Path) -> None:
    """No known checksum: at least check the IDX header against the file's length."""
    if len(content) < 8 or content[:2] != b"\x00\x00" or content[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad header)")
    ndim = content[3]
    dims = [int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(content) != expected:
        raise DataError(
            f"{path} is truncated or corrupted: header says {dims} ({expected} bytes), "
            f"file has {len(content)} bytes"
        )
    warnings.warn(f"{path}: no checksum known for this file; checked its IDX header only", stacklevel=2)


def _install_into_torchvision_root(folder: Path, dataset: str, cache: Path) -> None:
    """Verify the files in ``folder`` and lay them out where torchvision's class reads them."""
    cls = torchvision_classes()[dataset]
    raw = cache / cls.__name__ / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz_name, md5 in cls.resources:
        content = _read_verified(folder, gz_name, md5, dataset)
        target = raw / gz_name.removesuffix(".gz")
        tmp = target.with_suffix(".partial")
        tmp.write_bytes(content)
        tmp.replace(target)


def _from_torchvision(dataset: str, cache: Path, download: bool) -> tuple[Split, Split]:
    cls = torchvision_classes()[dataset]
    splits = []
    for train in (True, False):
        ds = cls(root=str(cache), train=train, download=download)
        images = ds.data.numpy().astype(np.uint8)[:, None]  # (N, 1, 28, 28)
        splits.append(Split(images, ds.targets.numpy().astype(np.int64)))
    return splits[0], splits[1]


def _no_data_message(dataset: str, tried: list[str], err: Exception) -> str:
    lines = [f"could not get the {dataset!r} dataset. Tried, in order:", *[f"  - {t}" for t in tried]]
    lines.append(f"The download failed: {err}")
    lines.append("To fix it, either:")
    if dataset in APT_PACKAGES:
        lines.append(f"  - install the Debian package: apt-get install {APT_PACKAGES[dataset]}")
    lines.append(
        "  - put the four IDX files (train-images-idx3-ubyte[.gz], ...) in a folder and set "
        "data.root to it in params.yaml"
    )
    lines.append("  - or use the embedded set: data.dataset: digits")
    return "\n".join(lines)


def load_raw(dataset: str, root: str | Path | None, cache: Path) -> RawDataset:
    """The dataset's official splits from the first source that has it (see module docstring)."""
    if dataset == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
        return RawDataset(Split(images, bunch.target.astype(np.int64)), None, "sklearn.datasets.load_digits")
    if dataset not in TORCHVISION_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
    tried: list[str] = []
    folders: list[tuple[str, Path]] = []
    if root is not None:
        folders.append(("data.root", Path(root)))
    if dataset in DEBIAN_FOLDERS:
        folders.append((f"Debian package {APT_PACKAGES[dataset]}", DEBIAN_FOLDERS[dataset]))
    for label, folder in folders:
        if label == "data.root" and not folder.is_dir():
            raise DataError(
                f"data.root is {str(folder)!r}, which is not a folder; fix data.root in params.yaml"
            )
        try:
            _install_into_torchvision_root(folder, dataset, cache)
        except FileNotFoundError as err:
            tried.append(f"{label}: {folder} ({err})")
            continue
        train, test = _from_torchvision(dataset, cache, download=False)
        return RawDataset(train, test, f"{label}: {folder}")
    tried.append(f"torchvision download of {torchvision_classes()[dataset].__name__} into {cache}")
    try:
        train, test = _from_torchvision(dataset, cache, download=True)
    except (RuntimeError, OSError) as err:
        raise DataError(_no_data_message(dataset, tried, err)) from err
    return RawDataset(train, test, f"torchvision download: {torchvision_classes()[dataset].mirrors[0]}")


# ------------------------------------------------------------------------------------------ splits


def _take(split: Split, idx: np.ndarray) -> Split:
    return Split(np.ascontiguousarray(split.images[idx]), split.labels[idx])


def make_splits(
    raw: RawDataset,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_sizes: dict[str, int | None] | None = None,
) -> dict[str, Split]:
    """Fixed, seeded train/val/test splits: validation carved from train (and test too, if none)."""
    rng = np.random.default_rng(seed)
    pool, test = raw.train, raw.test
    if test is None:
        perm = rng.permutation(len(pool.labels))
        n_test = max(1, round(test_fraction * len(perm)))
        test, pool = _take(pool, np.sort(perm[:n_test])), _take(pool, np.sort(perm[n_test:]))
    perm = rng.permutation(len(pool.labels))
    n_val = max(1, round(val_fraction * len(perm)))
    splits = {
        "train": _take(pool, np.sort(perm[n_val:])),
        "val": _take(pool, np.sort(perm[:n_val])),
        "test": test,
    }
    for name, cap in (max_sizes or {}).items():
        if cap is not None and cap < len(splits[name].labels):
            keep = np.sort(rng.permutation(len(splits[name].labels))[:cap])
            splits[name] = _take(splits[name], keep)
    return splits


# ------------------------------------------------------------------------------------ binarisation


def binarize_static(gray: np.ndarray, threshold: float) -> np.ndarray:
    """1 where the gray level (as a fraction of 255) exceeds ``threshold``."""
    return (gray.astype(np.float32) / 255.0 > threshold).astype(np.uint8)


def binarize_dynamic(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One Bernoulli draw per pixel with the gray level as its probability."""
    return (rng.random(gray.shape, dtype=np.float32) < gray.astype(np.float32) / 255.0).astype(np.uint8)


def bernoulli_resampler(gray: torch.Tensor, seed: int) -> Callable[[int], torch.Tensor]:
    """Fresh dynamic binarisation per epoch: ``draw(epoch)`` is seeded by (seed, epoch)."""
    probs = gray.float() / 255.0  # (N, C, H, W), on gray's device

    def draw(epoch: int) -> torch.Tensor:
        gen = torch.Generator(device=probs.device).manual_seed(seed * 100_003 + epoch)
        return torch.bernoulli(probs, generator=gen)

    return draw


def mutation_resampler(
    train: torch.Tensor | Callable[[int], torch.Tensor], rate: float, levels: int, seed: int
) -> Callable[[int], torch.Tensor]:
    """Ren et al. (2019)'s background training data: ``draw(epoch)`` is the training set with a fresh
    fraction ``rate`` of pixels each replaced by one of the *other* ``levels - 1`` levels, uniformly.

    Local structure is destroyed while population-level statistics (background, blank margins) survive,
    so a model of it explains what the likelihood ratio should cancel. ``train`` is a tensor of levels or
    an epoch's draw (e.g. :func:`bernoulli_resampler`, mutated after binarisation). The mutation stream
    is seeded by (seed, epoch) and independent of any other stream with the same seed.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"mutation rate must lie in [0, 1), got {rate}")

    def draw(epoch: int) -> torch.Tensor:
        x = train(epoch) if callable(train) else train  # (N, C, H, W) levels
        state = np.random.SeedSequence([seed, epoch, _MUTATION_STREAM]).generate_state(1, np.uint64)[0]
        gen = torch.Generator(device=x.device).manual_seed(int(state))
        mutate = torch.rand(x.shape, generator=gen, device=x.device) < rate  # (N, C, H, W)
        shift = torch.randint(1, levels, x.shape, generator=gen, device=x.device, dtype=x.dtype)  # >= 1
        return torch.where(mutate, torch.remainder(x + shift, levels), x)  # a mutated pixel changes level

    return draw


_MUTATION_STREAM = 0x6D757461  # "muta": keeps the mutation stream apart from other uses of the same seed


# --------------------------------------------------------------------------------------------- I/O


def save_split(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def load_split(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the earlier stages first (`dvc repro`)")
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def describe(splits: dict[str, Split]) -> dict[str, object]:
    """Counts, shape and a content hash per split, for logs and MLflow tags."""
    out: dict[str, object] = {}
    for name, split in splits.items():
        out[name] = {
            "n": len(split.labels),
            "shape": list(split.images.shape[1:]),
            "sha256": _sha256(split.images.tobytes() + split.labels.tobytes())[:16],
        }
    return out


# ------------------------------------------------------------------------------ stage-level helpers


def prepare(
    dataset: str,
    root: str | None,
    cache: Path,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_sizes: dict[str, int | None],
) -> tuple[dict[str, Split], str]:
    """The ``download`` stage's work: the dataset from its first available source, split."""
    raw = load_raw(dataset, root, cache)
    splits = make_splits(
        raw, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, max_sizes=max_sizes
    )
    return splits, raw.source


def binarize_splits(
    splits: dict[str, dict[str, np.ndarray]], mode: str, threshold: float, seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """The ``binarize`` stage's work: a binary copy of every split next to its gray levels.

    Static: threshold. Dynamic: one fixed, seeded Bernoulli draw per split (a different stream per
    split); training may instead draw afresh each epoch from the gray levels kept alongside.
    """
    out = {}
    for i, (name, arrays) in enumerate(splits.items()):
        gray = arrays["images"]
        if mode == "static":
            binary = binarize_static(gray, threshold)
        else:
            binary = binarize_dynamic(gray, np.random.default_rng([seed, i]))
        out[name] = {"binary": binary, "gray": gray, "labels": arrays["labels"]}
    return out


@dataclass(frozen=True)
class TrainingData:
    """What one density model trains and is evaluated on, as tensors of levels."""

    train: torch.Tensor | Callable[[int], torch.Tensor]
    val: torch.Tensor
    test: torch.Tensor
    image_shape: tuple[int, int, int]
    labels: dict[str, torch.Tensor]  # per split (int64): what a class-conditional model is trained on
    num_classes: int


def training_data(
    folder: Path, levels: int, mode: str, resample_train: bool, seed: int, device: torch.device
) -> TrainingData:
    """Binary models get the binarised images (fresh draws per epoch for dynamic + resample);
    8-bit models get the gray levels."""
    arrays = {name: load_split(folder / f"{name}.npz") for name in SPLITS}
    key = "binary" if levels == 2 else "gray"
    tensors = {name: torch.from_numpy(a[key]).float() for name, a in arrays.items()}
    train: torch.Tensor | Callable[[int], torch.Tensor] = tensors["train"].to(device)
    if levels == 2 and mode == "dynamic" and resample_train:
        train = bernoulli_resampler(torch.from_numpy(arrays["train"]["gray"]).to(device), seed)
    c, h, w = tensors["test"].shape[1:]
    labels = {name: torch.from_numpy(a["labels"]).long() for name, a in arrays.items()}
    num_classes = int(max(int(t.max()) for t in labels.values() if t.numel())) + 1
    return TrainingData(train, tensors["val"], tensors["test"], (c, h, w), labels, num_classes)


def first_eval_images(data: TrainingData, n: int | None) -> TrainingData:
    """``data`` with only the first ``n`` val and test images (and their labels); all for ``None``."""
    if n is None:
        return data
    labels = {k: v[:n] if k in ("val", "test") else v for k, v in data.labels.items()}
    return replace(data, val=data.val[:n], test=data.test[:n], labels=labels)
