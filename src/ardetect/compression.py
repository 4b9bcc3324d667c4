"""Lossless compression with an 8-bit autoregressive model: BPD is a code length, measured.

An entropy coder driven by the model's conditionals ``p(x_i | x_<i)`` writes an image in
``-log2 p(x) + O(1)`` bits, so the real size of the compressed stream per dimension should equal the
model's BPD. Here the coder is ANS (``constriction.stream.stack.AnsCoder``, 32-bit words, 24-bit
probabilities): :func:`encode` codes every pixel of a batch in the model's order (``model.order``) from
one forward pass; :func:`decode` rebuilds the images autoregressively, one forward pass per pixel on the
partly decoded batch (pixels not yet decoded are 0), and reads each pixel with the categorical at the
next position of ``model.order``.

Decoding works only if the decoder's coder model is bit-identical to the encoder's, pixel by pixel:

* each coder model is a pure elementwise function of the logits (``exp(logit - row max)`` in float64;
  constriction rescales each row to its fixed-point distribution), never a reduction whose rounding
  could depend on the array it sits in;
* the logits of a position must not depend on later pixels, to the last bit: PixelCNN's masked
  weights are exact zeros, so a later pixel adds an exact ``0 * x`` to the same sum in the same order,
  and the gated PixelCNN's shifted stacks never sum over it at all (measured on the trained
  ``pixelcnn_8bit`` and ``gated_pixelcnn_8bit``: the logits from the partly decoded image equal the
  full image's, bit for bit);
* the batch must be the same: on the CPU the convolution's kernel depends on the batch size, and one
  image alone gives logits that differ in the last bits from the same image in a batch of four. So
  images are coded in batches whose sizes are part of the stream (:func:`batch_sizes`), and the decoder
  runs exactly those batches.

A file (:func:`compress_images`) adds a header naming the model, its weights' SHA-256, the image shape
and the batching, a CRC-32 of the original pixels (checked after decoding: a decoder that drifted
fails loudly instead of writing a wrong image) and a CRC-32 of the whole file (checked before decoding).

Baselines (:func:`baseline_bpd`) compress each image on its own, as PNG does: PNG (Pillow,
``optimize=True``), gzip (level 9) and xz (``-9e``, .xz container), bits of each file summed over all
images and divided by all dimensions. The model's stream is one stream for all images, so its few bits
of coder overhead are shared, while each baseline pays its container header (PNG about 60 bytes) per
image.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import lzma
import math
import struct
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import PositiveInt
from tqdm.auto import tqdm

from ardetect.configs import Device, config_dataclass
from ardetect.images import png_bytes
from ardetect.models.base import ARModel

if TYPE_CHECKING:  # types only: the compress stage's closure stays free of the training loop
    from ardetect.training import ModelEntry

LEVELS = 256
MAGIC = b"ARDC"
VERSION = 1
# magic, version, levels, C, H, W, num_images, batch_size, num_words, weights sha256, pixels crc32
_HEADER = struct.Struct("<4sBHHHHIII32sI")
_CRC = struct.Struct("<I")
# `xz -9e` in the .xz container, with a 64 KiB dictionary instead of 64 MiB: the same bytes for images
# this small (the dictionary only has to cover the input), without allocating 64 MiB per image
_XZ = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 16}]


@config_dataclass
class CompressParams:
    """``compress`` in params.yaml (stage compress: entropy-coded test images vs the models' BPD)."""

    models: list[str] | None = None  # 8-bit models of train.models; null: every 8-bit detector model
    num_images: PositiveInt = 1000  # the first N clean test images
    roundtrip_images: PositiveInt = 1  # decoded and compared (one forward pass per pixel)
    batch_size: PositiveInt = 50  # images per forward pass while encoding
    device: Device = "auto"
    progress: bool = True


def compress_models(
    compress: CompressParams, train_models: Sequence[str], models: Mapping[str, ModelEntry]
) -> list[str]:
    """The models the stage codes: ``compress.models``, or :func:`eight_bit_models` when it is null."""
    return list(compress.models) if compress.models is not None else eight_bit_models(train_models, models)


def eight_bit_models(train_models: Sequence[str], models: Mapping[str, ModelEntry]) -> list[str]:
    """The 8-bit models of ``train.models``, in that order, without background models (trained on
    mutated images for a likelihood ratio, they code no real image well) or class-conditional ones (a
    mixture over labels has no single autoregressive code)."""
    return [
        n
        for n in train_models
        if n in models
        and models[n].levels == LEVELS
        and not (models[n].is_background or models[n].conditional)
    ]


def compress_problems(
    compress: CompressParams, train_models: Sequence[str], models: Mapping[str, ModelEntry]
) -> list[str]:
    """Every model to code must be a trained 8-bit model; the round trip checks images that are coded."""
    problems = []
    for i, name in enumerate(compress.models or []):
        if name not in train_models or name not in models:
            problems.append(
                f"compress.models[{i}] = {name!r}: not a trained model "
                f"(train.models: {', '.join(train_models)})"
            )
        elif models[name].conditional:
            problems.append(
                f"compress.models[{i}] = {name!r}: a class-conditional model's marginal is a mixture over "
                "labels, which no single autoregressive code follows; code an unconditional 8-bit model"
            )
        elif models[name].levels != LEVELS:
            problems.append(
                f"compress.models[{i}] = {name!r}: compression needs an 8-bit model (levels: 256), "
                f"it has levels {models[name].levels}"
            )
    if compress.models is None and not compress_models(compress, train_models, models):
        problems.append(
            "compress.models = null selects every 8-bit model of train.models, but there is none; "
            "add one (levels: 256) to train.models or list models under compress.models"
        )
    if compress.models == []:
        problems.append("compress.models = []: list at least one 8-bit model, or null for all of them")
    if compress.roundtrip_images > compress.num_images:
        problems.append(
            f"compress.roundtrip_images = {compress.roundtrip_images}: at most compress.num_images = "
            f"{compress.num_images} (the round trip decodes coded images)"
        )
    return problems


# --- the coder ---------------------------------------------------------------------------------------


def check_codable(model: ARModel) -> None:
    """Raise ValueError unless ``model`` gives categorical conditionals in one fixed order."""
    if model.levels == 2:
        raise ValueError(
            f"{model.name} is a binary model (levels=2); compression codes gray levels with an 8-bit "
            "model (levels: 256)"
        )
    if model.num_orderings != 1:
        raise ValueError(
            f"{model.name} mixes {model.num_orderings} orderings: its likelihood is no single-order code "
            "length; use a model with one ordering"
        )


def batch_sizes(num_images: int, batch_size: int, first: int | None = None) -> list[int]:
    """Sizes of the coding batches: ``first`` images (if given), then ``batch_size`` at a time."""
    if num_images < 0 or batch_size < 1 or (first is not None and not 0 < first <= num_images):
        raise ValueError(f"bad batching: {num_images} images, batch_size {batch_size}, first {first}")
    head = [first] if first else []
    rest = num_images - (first or 0)
    return head + [min(batch_size, rest - i) for i in range(0, rest, batch_size)]


def _coder_probs(logits: torch.Tensor, positions: torch.Tensor) -> np.ndarray:
    """Unnormalised float64 probabilities ``(P, B, levels)`` of ``positions`` (flat indices), step-major,
    from a forward pass's categorical logits ``(B, levels, C, H, W)``.

    ``exp(logit - row max)`` is elementwise after an exact max, so the same logits give the same rows
    whatever else the array holds (not torch's exp: its CPU kernel runs an array's tail through the
    scalar function, the rest through the vectorised one, which may round differently); constriction
    normalises each row itself.
    """
    flat = logits.flatten(2)  # (B, levels, D)
    rows: np.ndarray = flat.permute(2, 0, 1)[positions].double().cpu().numpy()  # (P, B, levels)
    rows -= rows.max(axis=-1, keepdims=True)
    return np.exp(rows, out=rows)  # numpy's exp: one code path for every element, wherever it sits


def _family() -> Any:
    import constriction

    return constriction.stream.model.Categorical(perfect=False)


def _split(images: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    return np.split(images, np.cumsum(sizes)[:-1]) if len(sizes) else []


def _check_images(model: ARModel, images: np.ndarray) -> None:
    if images.dtype != np.uint8 or tuple(images.shape[1:]) != model.image_shape:
        raise ValueError(
            f"{model.name} codes uint8 images of shape (N, {', '.join(map(str, model.image_shape))}), "
            f"got {images.dtype} of shape {images.shape}"
        )


@dataclasses.dataclass(frozen=True)
class Stream:
    """An ANS stream and what the model says it should cost."""

    words: np.ndarray  # (W,) uint32
    model_bits: np.ndarray  # (N,) float64: -log2 p(x) of each image by ``log_prob_from_logits``

    @property
    def bits(self) -> int:
        """The stream's real length: whole 32-bit words, as stored."""
        return 32 * len(self.words)


@torch.inference_mode()
def encode(
    model: ARModel,
    images: np.ndarray,
    sizes: Sequence[int],
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Stream:
    """The ANS stream of uint8 ``images`` (N, C, H, W), coded in batches of ``sizes``, with each image's
    -log2 p(x) from the same forward pass (the model's ``log_prob_from_logits``, as ``log_prob``).

    ANS is a stack: the last batch goes in first, each batch step-major (all images' pixel ``order[0]``,
    then ``order[1]``, ...), so :func:`decode` reads image batches and pixels in their natural order.
    """
    import constriction

    check_codable(model)
    _check_images(model, images)
    if sum(sizes) != len(images):
        raise ValueError(f"batch sizes {list(sizes)} do not add up to {len(images)} images")
    model = model.to(device).eval()
    order = model.order.to(device)
    coder, family = constriction.stream.stack.AnsCoder(), _family()
    nats = []
    for batch in tqdm(_split(images, sizes)[::-1], desc="encode", leave=False, disable=not progress):
        x = torch.as_tensor(batch).to(device).float()  # (B, C, H, W) levels, as decode feeds them
        logits = model(x)  # (B, levels, C, H, W)
        nats.append(-model.log_prob_from_logits(logits, x).double().cpu().numpy())  # (B,)
        probs = _coder_probs(logits, order)  # (D, B, levels)
        symbols = x.flatten(1)[:, order].T  # (D, B)
        coder.encode_reverse(
            symbols.reshape(-1).to(torch.int32).cpu().numpy(), family, probs.reshape(-1, model.levels)
        )
    model_bits = np.concatenate(nats[::-1]) / math.log(2) if nats else np.zeros(0)
    return Stream(coder.get_compressed(), model_bits)


@torch.inference_mode()
def decode(
    model: ARModel,
    words: np.ndarray,
    sizes: Sequence[int],
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """The first ``sum(sizes)`` images (uint8, N, C, H, W) of an :func:`encode` stream, batch by batch
    with the encoder's batches, one forward pass per pixel. Wrong words or another model give other
    images (or a constriction error), never an exception-free guarantee: check the result."""
    import constriction

    check_codable(model)
    model = model.to(device).eval()
    coder, family = constriction.stream.stack.AnsCoder(np.asarray(words, np.uint32)), _family()
    out = []
    steps = model.order.tolist()
    for b in sizes:
        x = torch.zeros((b, *model.image_shape), device=device)  # (B, C, H, W), undecoded pixels 0
        flat = x.view(b, -1)  # (B, D), shares storage with x
        for idx in tqdm(steps, desc="decode", leave=False, disable=not progress):
            probs = _coder_probs(model(x), torch.tensor([idx], device=device))  # (1, B, levels)
            flat[:, idx] = torch.from_numpy(coder.decode(family, probs[0]).astype(np.float32)).to(device)
        out.append(x.to(torch.uint8).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *model.image_shape), np.uint8)


# --- baselines ---------------------------------------------------------------------------------------


def baseline_bpd(images: np.ndarray) -> dict[str, float]:
    """PNG, gzip and xz bits per dimension of uint8 gray images (N, 1, H, W), each image its own file."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"baselines take uint8 gray images (N, 1, H, W), got {images.dtype} {images.shape}")
    sizes = {
        "png": sum(png_bytes(im[0]) for im in images),
        "gzip": sum(len(gzip.compress(im.tobytes(), compresslevel=9, mtime=0)) for im in images),
        "xz": sum(len(lzma.compress(im.tobytes(), filters=_XZ)) for im in images),
    }
    return {f"{k}_bpd": 8 * v / images.size for k, v in sizes.items()}


# --- the stage's measurement -------------------------------------------------------------------------


def measure(
    model: ARModel,
    images: np.ndarray,
    *,
    roundtrip_images: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Code ``images`` in one stream and compare its size with the model's BPD on them.

    The first batch holds the ``roundtrip_images`` images that are decoded again, so the decoder runs
    exactly the batch the encoder ran. The BPD comes from the encoder's forward pass through the
    model's own likelihood (``log_prob_from_logits``, what ``log_prob`` and ``score_bpd`` run), which
    saves a second pass over the images.
    """
    sizes = batch_sizes(len(images), batch_size, first=roundtrip_images)
    start = time.perf_counter()
    stream = encode(model, images, sizes, device, progress)
    encode_seconds = time.perf_counter() - start
    start = time.perf_counter()
    decoded = decode(model, stream.words, sizes[:1], device, progress)
    decode_seconds = time.perf_counter() - start
    coded, model_bpd = stream.bits / images.size, float(stream.model_bits.sum()) / images.size
    return {
        "coded_bpd": coded,
        "model_bpd": model_bpd,
        "difference": coded - model_bpd,
        "roundtrip_ok": bool(np.array_equal(decoded, images[:roundtrip_images])),
        "num_images": len(images),
        "roundtrip_images": roundtrip_images,
        "encode_seconds": encode_seconds,
        "decode_seconds": decode_seconds,
    }


def markdown_section(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """report.md's compression section: one row per model of ``compress.json``."""
    head = (
        "| model | coded bpd | model bpd | difference | round trip | PNG bpd | gzip bpd | xz bpd |\n"
        "|---|---:|---:|---:|:---:|---:|---:|---:|"
    )
    rows = [
        f"| {name} | {m['coded_bpd']:.4f} | {m['model_bpd']:.4f} | {m['difference']:+.4f} | "
        f"{'ok' if m['roundtrip_ok'] else 'FAILED'} | {m['png_bpd']:.3f} | {m['gzip_bpd']:.3f} | "
        f"{m['xz_bpd']:.3f} |"
        for name, m in metrics.items()
    ]
    n = {int(m["num_images"]) for m in metrics.values()}
    return "\n".join(
        [
            "## Compression: BPD is a code length",
            "",
            f"The first {', '.join(map(str, sorted(n)))} clean test images entropy-coded (ANS) with each "
            "8-bit model's conditionals, as one stream: real bits per dimension of the stream vs the "
            "model's BPD; the round trip decodes the first images again, one forward pass per pixel. "
            "PNG, gzip and xz compress each image on its own.",
            "",
            head,
            *rows,
        ]
    )


# --- files -------------------------------------------------------------------------------------------


class CompressedFileError(ValueError):
    """A compressed file that is corrupt, or was written with another model."""


@dataclasses.dataclass(frozen=True)
class Header:
    """What a compressed file says about itself."""

    name: str
    weights_sha256: bytes
    levels: int
    image_shape: tuple[int, int, int]
    num_images: int
    batch_size: int
    pixels_crc: int


def weights_sha256(model: ARModel) -> bytes:
    """SHA-256 of the architecture, levels, shape and every tensor of the state dict (in key order)."""
    h = hashlib.sha256(f"{model.name}|{model.levels}|{model.image_shape}".encode())
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def compress_images(
    model: ARModel, name: str, images: np.ndarray, batch_size: int = 100, device: torch.device | str = "cpu"
) -> bytes:
    """A self-describing compressed file of uint8 ``images`` (N, C, H, W) under the model ``name``."""
    _check_images(model, images)
    words = encode(model, images, batch_sizes(len(images), batch_size), device).words
    raw_name = name.encode()
    if len(raw_name) > 255:
        raise ValueError(f"model name too long for the file header ({len(raw_name)} bytes, at most 255)")
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        model.levels,
        *model.image_shape,
        len(images),
        batch_size,
        len(words),
        weights_sha256(model),
        zlib.crc32(images.tobytes()),
    )
    body = header + bytes([len(raw_name)]) + raw_name + words.astype("<u4").tobytes()
    return body + _CRC.pack(zlib.crc32(body))


def read_file(data: bytes) -> tuple[Header, np.ndarray]:
    """The header and the coded words of a :func:`compress_images` file; CompressedFileError if the file
    is not one, is truncated or corrupt, or is of an unknown version."""
    if len(data) < 4 or data[:4] != MAGIC:
        raise CompressedFileError("not an ardetect compressed file (wrong magic number)")
    if len(data) < _HEADER.size + 1 + _CRC.size:
        raise CompressedFileError(f"truncated file ({len(data)} bytes, shorter than the header)")
    body, (crc,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
    _, version, levels, c, h, w, n, batch, num_words, sha, pixels_crc = _HEADER.unpack_from(body)
    if version != VERSION:
        raise CompressedFileError(f"file format version {version}; this ardetect reads version {VERSION}")
    name_len = body[_HEADER.size]
    start = _HEADER.size + 1 + name_len
    if len(body) != start + 4 * num_words or zlib.crc32(body) != crc:
        raise CompressedFileError(
            "corrupt file: its checksum or length does not match (truncated or damaged)"
        )
    name = body[_HEADER.size + 1 : start].decode(errors="replace")
    words = np.frombuffer(body, dtype="<u4", offset=start).astype(np.uint32)
    return Header(name, sha, levels, (c, h, w), n, batch, pixels_crc), words


def decompress_images(model: ARModel, data: bytes, device: torch.device | str = "cpu") -> np.ndarray:
    """The uint8 images (N, C, H, W) of a :func:`compress_images` file, checked against ``model`` before
    decoding and against the original pixels' CRC after."""
    header, words = read_file(data)
    if header.levels != model.levels or header.image_shape != model.image_shape:
        raise CompressedFileError(
            f"the file holds {header.levels}-level images of shape {header.image_shape}, but "
            f"{model.name} models {model.levels}-level images of shape {model.image_shape}; decompress "
            f"with the model it was compressed with ({header.name!r})"
        )
    if header.weights_sha256 != weights_sha256(model):
        raise CompressedFileError(
            f"the file was compressed with model {header.name!r} (weights sha256 "
            f"{header.weights_sha256.hex()[:12]}…), but the given model's weights differ "
            f"({weights_sha256(model).hex()[:12]}…); decompress with the same checkpoint"
        )
    images = decode(model, words, batch_sizes(header.num_images, header.batch_size), device)
    if zlib.crc32(images.tobytes()) != header.pixels_crc:
        raise CompressedFileError(
            "decoded pixels do not match the original's checksum: the model's conditionals differ from "
            "those at compression time (another device or library version?)"
        )
    return images


__all__ = [
    "CompressParams",
    "CompressedFileError",
    "Header",
    "Stream",
    "baseline_bpd",
    "batch_sizes",
    "compress_images",
    "compress_models",
    "compress_problems",
    "decode",
    "decompress_images",
    "eight_bit_models",
    "encode",
    "markdown_section",
    "measure",
    "read_file",
    "weights_sha256",
]


def compress_image(model: ARModel, name: str, gray: np.ndarray) -> tuple[bytes, float]:
    """One (H, W) uint8 image as a compressed file (``ardetect compress``), and the model's BPD of it:
    the code length the file should come close to, header aside."""
    images = gray[None, None]  # (1, 1, H, W)
    data = compress_images(model, name, images)
    with torch.inference_mode():
        bpd = float(model.bpd(torch.as_tensor(images).float())[0])
    return data, bpd


def single_image_header(data: bytes) -> Header:
    """The header of a file that ``ardetect compress`` wrote (one image); CompressedFileError otherwise,
    before any model work."""
    header, _ = read_file(data)
    if header.num_images != 1:
        raise CompressedFileError(f"holds {header.num_images} images; `ardetect compress` writes one")
    return header


def summary_line(name: str, m: Mapping[str, Any]) -> str:
    """One model's compress.json entry as the stage prints it."""
    return (
        f"{name}: {m['coded_bpd']:.4f} coded vs {m['model_bpd']:.4f} model bits/dim "
        f"({m['difference']:+.4f}), round trip {'ok' if m['roundtrip_ok'] else 'FAILED'}; "
        f"PNG {m['png_bpd']:.3f}, gzip {m['gzip_bpd']:.3f}, xz {m['xz_bpd']:.3f}"
    )


def measure_models(
    paths: Mapping[str, Path], images: np.ndarray, config: CompressParams, device: torch.device | str = "cpu"
) -> dict[str, dict[str, Any]]:
    """compress.json: :func:`measure` per model checkpoint in ``paths``, with the PNG/gzip/xz baselines
    of the same images; prints each model's line as it finishes."""
    from ardetect.models import load_model

    baselines, metrics = baseline_bpd(images), {}
    for name, path in paths.items():
        m = measure(load_model(path), images, roundtrip_images=config.roundtrip_images,
                    batch_size=config.batch_size, device=device, progress=config.progress)  # fmt: skip
        metrics[name] = {**m, **baselines}
        print(summary_line(name, metrics[name]))
    return metrics
