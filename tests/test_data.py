from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ardetect import data
from ardetect.data import (
    DataError,
    RawDataset,
    Split,
    bernoulli_resampler,
    binarize_dynamic,
    binarize_splits,
    binarize_static,
    load_raw,
    make_splits,
)

DEBIAN = data.DEBIAN_FOLDERS["fashion-mnist"]
needs_debian = pytest.mark.skipif(
    not DEBIAN.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = False) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, arr in files.items():
        content = idx_bytes(arr)
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as fh:
                fh.write(content)
        else:
            (folder / name).write_bytes(content)


def test_digits_are_embedded_uint8(tmp_path: Path) -> None:
    raw = load_raw("digits", None, tmp_path)
    assert raw.train.images.shape == (1797, 1, 8, 8)
    assert raw.train.images.dtype == np.uint8 and raw.train.images.max() == 255
    assert raw.test is None


def test_splits_are_fixed_disjoint_and_seeded(tmp_path: Path) -> None:
    raw = load_raw("digits", None, tmp_path)
    a = make_splits(raw, val_fraction=0.1, test_fraction=0.2, seed=3)
    b = make_splits(raw, val_fraction=0.1, test_fraction=0.2, seed=3)
    c = make_splits(raw, val_fraction=0.1, test_fraction=0.2, seed=4)
    sizes = {k: len(v.labels) for k, v in a.items()}
    assert sizes == {"test": 359, "val": 144, "train": 1294}
    for k in a:
        np.testing.assert_array_equal(a[k].images, b[k].images)
    assert not np.array_equal(a["val"].images, c["val"].images)
    rows = lambda s: {r.tobytes() for r in s.images}  # noqa: E731
    assert not rows(a["train"]) & rows(a["val"]) - rows(a["test"])  # duplicates in digits aside
    capped = make_splits(raw, val_fraction=0.1, test_fraction=0.2, seed=3, max_sizes={"train": 100})
    assert len(capped["train"].labels) == 100


def test_official_test_split_is_kept() -> None:
    train = Split(np.zeros((50, 1, 2, 2), np.uint8), np.arange(50))
    test = Split(np.ones((7, 1, 2, 2), np.uint8), np.arange(7))
    splits = make_splits(RawDataset(train, test, "x"), val_fraction=0.2, test_fraction=0.5, seed=0)
    assert (
        len(splits["test"].labels) == 7
        and len(splits["val"].labels) == 10
        and len(splits["train"].labels) == 40
    )


@needs_debian
def test_fashion_mnist_from_the_debian_package(tmp_path: Path) -> None:
    raw = load_raw("fashion-mnist", None, tmp_path)
    assert raw.train.images.shape == (60000, 1, 28, 28) and raw.test is not None
    assert raw.test.images.shape == (10000, 1, 28, 28)
    assert "dataset-fashion-mnist" in raw.source
    assert set(np.unique(raw.train.labels)) == set(range(10))


@needs_debian
def test_a_truncated_file_fails_its_checksum_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "fm"
    shutil.copytree(DEBIAN, folder)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    content = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(content[:-100]))  # a valid gzip of truncated contents
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz fails its SHA-256 checksum"):
        load_raw("fashion-mnist", folder, tmp_path / "cache")
    labels.write_bytes(labels.read_bytes()[:50])  # a truncated archive
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz is corrupted or truncated"):
        load_raw("fashion-mnist", folder, tmp_path / "cache")


def test_local_folder_without_known_checksum_is_checked_structurally(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "mnist")
    with pytest.warns(UserWarning, match="no checksum known"):
        raw = load_raw("mnist", tmp_path / "mnist", tmp_path / "cache")
    assert raw.train.images.shape == (20, 1, 28, 28) and raw.source.startswith("data.root")
    f = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte is truncated or corrupted"):
        load_raw("mnist", tmp_path / "mnist", tmp_path / "cache2")


def test_gz_that_fails_torchvision_md5_is_rejected(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "mnist", gz=True)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz fails torchvision's MD5 checksum"):
        load_raw("mnist", tmp_path / "mnist", tmp_path / "cache")


def test_offline_without_a_local_copy_says_how_to_get_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Point the canonical download at a closed local port: the real download code runs and fails fast.
    monkeypatch.setattr(data.torchvision_classes()["mnist"], "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError) as info:
        load_raw("mnist", None, tmp_path)
    msg = str(info.value)
    assert "torchvision download of MNIST" in msg and "data.root" in msg and "digits" in msg
    monkeypatch.setitem(data.DEBIAN_FOLDERS, "fashion-mnist", tmp_path / "absent")
    monkeypatch.setattr(data.torchvision_classes()["fashion-mnist"], "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_raw("fashion-mnist", None, tmp_path)


def test_data_root_that_is_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.root .* is not a folder"):
        load_raw("mnist", tmp_path / "nope", tmp_path)


def test_static_and_dynamic_binarisation() -> None:
    gray = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(binarize_static(gray, 0.5), [[0, 0, 1, 1]])
    big = np.full((200_000,), 64, dtype=np.uint8)
    draws = binarize_dynamic(big, np.random.default_rng(0))
    assert draws.dtype == np.uint8 and set(np.unique(draws)) == {0, 1}
    assert draws.mean() == pytest.approx(64 / 255, abs=0.005)
    np.testing.assert_array_equal(
        binarize_dynamic(gray, np.random.default_rng(1)), binarize_dynamic(gray, np.random.default_rng(1))
    )
    assert binarize_dynamic(np.array([0, 255], np.uint8), np.random.default_rng(2)).tolist() == [0, 1]


def test_binarize_splits_keeps_gray_and_uses_a_stream_per_split() -> None:
    gray = np.full((100, 1, 4, 4), 128, np.uint8)
    splits = {k: {"images": gray, "labels": np.zeros(100, np.int64)} for k in ("train", "val", "test")}
    out = binarize_splits(splits, "dynamic", 0.5, seed=0)
    assert not np.array_equal(out["val"]["binary"], out["test"]["binary"])
    np.testing.assert_array_equal(out["val"]["gray"], gray)
    again = binarize_splits(splits, "dynamic", 0.5, seed=0)
    np.testing.assert_array_equal(out["test"]["binary"], again["test"]["binary"])
    static = binarize_splits(splits, "static", 0.5, seed=0)
    assert static["train"]["binary"].all()


def test_resampler_draws_fresh_per_epoch_and_reproducibly() -> None:
    draw = bernoulli_resampler(torch.full((50, 1, 8, 8), 128, dtype=torch.uint8), seed=1)
    assert not torch.equal(draw(1), draw(2))
    assert torch.equal(draw(3), draw(3))
    assert draw(1).mean().item() == pytest.approx(128 / 255, abs=0.03)
