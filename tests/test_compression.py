"""Entropy coding with an 8-bit model: lossless, as long as the model's -log2 p(x), tied to the model
and the words; the file format and the `ardetect compress`/`decompress` commands."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ardetect import cli, compression
from ardetect.compression import (
    CompressedFileError,
    CompressParams,
    baseline_bpd,
    batch_sizes,
    compress_images,
    compress_models,
    compress_problems,
    decode,
    decompress_images,
    encode,
)
from ardetect.models import build_model, save_model
from ardetect.models.base import ARModel
from ardetect.training import model_entry_of

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, 6, 6)
ANS_OVERHEAD_BITS = 64  # the coder's head state, flushed as at most two 32-bit words

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int) -> ARModel:
    """A random 8-bit PixelCNN with peaked conditionals (a strong output bias), so codes are far from
    the 8 bits per pixel of a uniform model and the coder must use each pixel's own conditional."""
    torch.manual_seed(seed)
    model = build_model("pixelcnn", SHAPE, levels=256, channels=8, blocks=1, head_channels=8).eval()
    with torch.no_grad():
        model.head[-1].bias.copy_(4 * torch.randn(256))
    return model


@pytest.fixture(scope="module")
def model() -> ARModel:
    return tiny_model(0)


@pytest.fixture(scope="module")
def images(model: ARModel) -> np.ndarray:
    """Five samples of the model and two uniform-noise images, (7, 1, 6, 6) uint8."""
    torch.manual_seed(1)
    samples = model.sample(5).to(torch.uint8).numpy()
    noise = np.random.default_rng(0).integers(0, 256, (2, *SHAPE), dtype=np.uint8)
    return np.concatenate([samples, noise])


def ideal_bits(model: ARModel, images: np.ndarray) -> float:
    """-log2 p(x) summed over the images, from the model's own likelihood."""
    with torch.no_grad():
        return float(-model.log_prob(torch.as_tensor(images).float()).double().sum()) / math.log(2)


def test_round_trip_is_lossless_and_costs_minus_log2_p(model: ARModel, images: np.ndarray) -> None:
    sizes = batch_sizes(len(images), 3, first=2)
    assert sizes == [2, 3, 2]
    stream = encode(model, images, sizes)
    np.testing.assert_array_equal(decode(model, stream.words, sizes), images)  # noise pixels too
    np.testing.assert_array_equal(decode(model, stream.words, sizes[:1]), images[:2])  # a prefix
    samples = encode(model, images[:5], batch_sizes(5, 3))
    ideal = ideal_bits(model, images[:5])
    assert ideal < 8 * images[:5].size / 4  # peaked conditionals: far below 8 bits per pixel
    assert -1.0 <= samples.bits - ideal <= ANS_OVERHEAD_BITS
    # the stream's own account of -log2 p(x), image by image, is the model's log_prob
    with torch.no_grad():
        nats = -model.log_prob(torch.as_tensor(images).float()).double().numpy()
    np.testing.assert_allclose(stream.model_bits, nats / math.log(2), rtol=1e-5)


def test_unlikely_pixels_cost_more_but_at_most_their_information(model: ARModel, images: np.ndarray) -> None:
    """Noise costs many times the samples; never more than -log2 p(x) (constriction floors each level's
    probability at 2^-24, so a pixel the model all but rules out costs at most about 24 bits)."""
    bits = {}
    for key, part in (("samples", images[:5]), ("noise", images[5:])):
        bits[key] = encode(model, part, [len(part)]).bits
        assert bits[key] <= ideal_bits(model, part) + ANS_OVERHEAD_BITS
        assert bits[key] >= 0.5 * ideal_bits(model, part)
    per_pixel = {k: v / (5 if k == "samples" else 2) for k, v in bits.items()}
    assert per_pixel["noise"] > 10 * per_pixel["samples"]


def test_decoding_depends_on_the_model_and_every_word(model: ARModel, images: np.ndarray) -> None:
    sizes = batch_sizes(len(images), 4)
    words = encode(model, images, sizes).words
    assert not np.array_equal(decode(tiny_model(1), words, sizes), images)
    for i in (0, len(words) // 2, len(words) - 1):
        damaged = words.copy()
        damaged[i] ^= np.uint32(1 << 30)
        try:
            decoded = decode(model, damaged, sizes)
        except (ValueError, AssertionError):  # constriction may notice an impossible state
            continue
        assert not np.array_equal(decoded, images), f"flipping a bit of word {i} went unnoticed"


def test_batch_sizes() -> None:
    assert batch_sizes(10, 4) == [4, 4, 2]
    assert batch_sizes(10, 4, first=3) == [3, 4, 3]
    assert batch_sizes(3, 4, first=3) == [3]
    with pytest.raises(ValueError):
        batch_sizes(3, 4, first=5)


def test_binary_model_is_refused() -> None:
    with pytest.raises(ValueError, match="binary model"):
        encode(build_model("fvsbn", SHAPE), np.zeros((1, *SHAPE), np.uint8), [1])


# --- files ---------------------------------------------------------------------------------------


def test_file_round_trip_and_clear_errors(
    model: ARModel, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = compress_images(model, "tiny", images, batch_size=4)
    np.testing.assert_array_equal(decompress_images(model, data), images)
    with pytest.raises(CompressedFileError, match=r"compressed with model 'tiny'.*weights"):
        decompress_images(tiny_model(1), data)
    other_shape = build_model("pixelcnn", (1, 5, 5), levels=256, channels=4, blocks=1, head_channels=4)
    with pytest.raises(CompressedFileError, match=r"shape \(1, 6, 6\)"):
        decompress_images(other_shape, data)
    for bad, problem in [
        (b"PNG not ours", "magic"),
        (data[:10], "truncated"),
        (data[:-9] + data[-8:], "corrupt"),
        (data[:60] + bytes([data[60] ^ 1]) + data[61:], "corrupt"),
    ]:
        with pytest.raises(CompressedFileError, match=problem):
            decompress_images(model, bad)
    # a decoder whose conditionals drift is caught by the pixels' checksum, not trusted
    monkeypatch.setattr(compression, "weights_sha256", lambda m: b"\0" * 32)
    data = compress_images(model, "tiny", images, batch_size=4)
    with pytest.raises(CompressedFileError, match="checksum"):
        decompress_images(tiny_model(1), data)


# --- baselines and params ------------------------------------------------------------------------


def test_baselines_cannot_shrink_noise_but_shrink_flat_images() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    flat = np.full((4, 1, 28, 28), 7, np.uint8)
    for key, value in baseline_bpd(noise).items():
        assert value > 8.0, key  # incompressible: 8 bits per pixel plus the container
    for key, value in baseline_bpd(flat).items():
        assert value < 2.0, key


def test_compress_models_and_problems() -> None:
    models = {
        "bin": model_entry_of({"arch": "fvsbn"}),
        "a8": model_entry_of({"arch": "pixelcnn", "levels": 256}),
        "b8": model_entry_of({"arch": "gated_pixelcnn", "levels": 256}),
        "bg8": model_entry_of({"arch": "pixelcnn", "levels": 256, "mutation_rate": 0.1}),
    }
    train = ["bin", "b8", "a8", "bg8"]
    assert compress_models(CompressParams(), train, models) == ["b8", "a8"]  # no background model
    assert compress_problems(CompressParams(), train, models) == []
    problems = compress_problems(
        CompressParams(models=["bin", "zz"], roundtrip_images=9, num_images=5), train, models
    )
    assert len(problems) == 3
    assert "'bin': compression needs an 8-bit model" in problems[0]
    assert "'zz': not a trained model" in problems[1]
    assert "roundtrip_images = 9" in problems[2]
    assert "there is none" in compress_problems(CompressParams(), ["bin"], models)[0]


# --- CLI -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, model: ARModel) -> Path:
    root = tmp_path_factory.mktemp("project")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["models"] = ["tiny_bin", "tiny_8bit", "other_8bit"]
    hparams = {"channels": 8, "blocks": 1, "head_channels": 8}
    raw["models"] = {
        "tiny_bin": {"arch": "fvsbn"},
        "tiny_8bit": {"arch": "pixelcnn", "levels": 256, "hparams": hparams},
        "other_8bit": {"arch": "pixelcnn", "levels": 256, "hparams": hparams},
    }
    for section in ("adaptive", "purify"):  # other stages' model choices must exist here
        if section in raw:
            raw[section]["model"] = "tiny_8bit"
    if "adaptive" in raw:
        raw["adaptive"]["conditional_model"] = None
    if "ood" in raw:
        raw["ood"]["background"] = {}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    save_model(build_model("fvsbn", SHAPE), root / "data/models/tiny_bin/model.pt")
    save_model(model, root / "data/models/tiny_8bit/model.pt")
    save_model(tiny_model(1), root / "data/models/other_8bit/model.pt")
    return root


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_round_trip_png(
    capsys: pytest.CaptureFixture[str], project: Path, images: np.ndarray, tmp_path: Path
) -> None:
    src, packed, back = tmp_path / "in.png", tmp_path / "x.ardc", tmp_path / "out.png"
    Image.fromarray(images[0, 0], mode="L").save(src)
    code, out, err = _run(capsys, "compress", str(src), str(packed), "--root", str(project))
    assert code == 0, err
    assert "model tiny_8bit" in out  # the first 8-bit model (no score metrics to rank them)
    code, out, err = _run(capsys, "decompress", str(packed), str(back), "--root", str(project))
    assert code == 0, err
    with Image.open(back) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), images[0, 0])


def test_cli_bad_files_exit_2(capsys: pytest.CaptureFixture[str], project: Path, tmp_path: Path) -> None:
    src, packed = tmp_path / "in.png", tmp_path / "x.ardc"
    Image.fromarray(np.zeros((6, 6), np.uint8), mode="L").save(src)
    root = ("--root", str(project))
    assert _run(capsys, "compress", str(src), str(packed), *root)[0] == 0
    corrupt = tmp_path / "corrupt.ardc"
    data = packed.read_bytes()
    corrupt.write_bytes(data[:-6] + bytes([data[-6] ^ 0xFF]) + data[-5:])
    cases = [
        (("decompress", str(corrupt), str(tmp_path / "a.png")), "corrupt file"),
        (("decompress", str(src), str(tmp_path / "b.png")), "not an ardetect compressed file"),
        (("decompress", str(tmp_path / "none"), str(tmp_path / "c.png")), "no such file"),
        (("decompress", str(packed), str(tmp_path / "d.png"), "--model", "other_8bit"), "weights"),
        (("compress", str(src), str(packed), "--model", "tiny_bin"), "compression needs an 8-bit model"),
    ]
    for argv, message in cases:
        code, _, err = _run(capsys, *argv, *root)
        assert code == 2 and message in err, (argv, err)
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((7, 7), np.uint8), mode="L").save(big)
    code, _, err = _run(capsys, "compress", str(big), str(packed), *root)
    assert code == 2 and "expected 6x6" in err
