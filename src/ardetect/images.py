"""Gray images from files, as the pipeline scores them: (H, W) uint8 levels.

Bad files raise :class:`ImageError` with one line naming the file, the problem and what is expected, so
a command line tool can print it as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


class ImageError(ValueError):
    """A file that is not a gray image of the expected size (the message names the file)."""


def _gray_from_pil(path: Path) -> np.ndarray:
    """A (H, W) uint8 gray image from a Pillow-readable file (mode L or 1; RGB/RGBA/P with equal channels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "L":
                return np.asarray(im, dtype=np.uint8).copy()
            if mode == "1":
                return np.asarray(im.convert("L"), dtype=np.uint8).copy()
            if mode in ("RGB", "RGBA", "P", "PA", "LA"):
                rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)  # (H, W, 4)
            else:
                raise ImageError(
                    f"{path}: unsupported image mode {mode!r}; expected an 8-bit grayscale image (mode 'L')"
                )
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: not an image Pillow can read ({err})") from None
    if not (rgba[..., 3] == 255).all():
        raise ImageError(f"{path}: image has transparent pixels; expected an opaque 8-bit grayscale image")
    rgb = rgba[..., :3]
    if not ((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])).all():
        raise ImageError(
            f"{path}: colour image (mode {mode}, channels differ); expected an 8-bit grayscale image "
            "(mode 'L', or RGB with equal channels)"
        )
    return rgb[..., 0].copy()


def _gray_from_npy(path: Path) -> np.ndarray:
    """A (H, W) uint8 gray image from a .npy array: uint8 levels, or floats in [0, 1] (rounded to 1/255)."""
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ImageError(f"{path}: not a readable .npy array ({err})") from None
    if not isinstance(a, np.ndarray):
        raise ImageError(f"{path}: expected one array in a .npy file, got {type(a).__name__}")
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])  # (1, H, W) or (H, W, 1)
    if a.ndim == 3 and (a.shape[0] in (3, 4) or a.shape[-1] in (3, 4)):
        raise ImageError(f"{path}: colour image of shape {a.shape}; expected one gray channel (H, W)")
    if a.ndim != 2:
        raise ImageError(f"{path}: expected a gray image of shape (H, W) or (1, H, W), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.copy()
    if not np.issubdtype(a.dtype, np.floating):
        raise ImageError(
            f"{path}: wrong dtype {a.dtype}; expected uint8 gray levels 0..255 or floats in [0, 1]"
        )
    if not np.isfinite(a).all():
        raise ImageError(f"{path}: array contains NaN or infinite values")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ImageError(
            f"{path}: float values must lie in [0, 1] (gray/255), got [{a.min():g}, {a.max():g}]"
        )
    return np.rint(a.astype(np.float64) * 255).astype(np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """Read one gray image as (H, W) uint8, or raise :class:`ImageError` naming the file and the problem.

    ``.npy``: uint8 gray levels, or floats in [0, 1] rounded to the nearest of the 256 levels (the
    pipeline stores and scores 8-bit images), shape (H, W), (1, H, W) or (H, W, 1). Any other file is
    read with Pillow: 8-bit grayscale (mode ``L``; bilevel ``1`` too), or RGB/RGBA/palette images whose
    channels are all equal and which are opaque.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    return _gray_from_npy(path) if path.suffix.lower() == ".npy" else _gray_from_pil(path)


def check_size(path: str | Path, gray: np.ndarray, image_shape: Sequence[int]) -> None:
    """Raise :class:`ImageError` unless the (H, W) image fits a model of ``image_shape`` (1, H, W)."""
    h, w = image_shape[-2:]
    if gray.shape != (h, w):
        raise ImageError(f"{path}: expected {h}x{w}, got {gray.shape[0]}x{gray.shape[1]}")


def png_bytes(plane: np.ndarray) -> int:
    """Size of a 2-D image as an optimized PNG (Pillow): uint8 → 8-bit gray, bool → 1-bit. The generic
    compressor that BPD is compared with (compression baselines, OOD input complexity)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(plane).save(buf, format="PNG", optimize=True)
    return buf.tell()
