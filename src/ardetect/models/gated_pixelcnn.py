"""Gated PixelCNN (van den Oord et al., 2016, "Conditional Image Generation with PixelCNN Decoders").

Two stacks replace PixelCNN's masked convolutions, which removes its blind spot:

* the *vertical* stack sees a full rectangle of rows at and above the current row (a (p+1) x k
  convolution padded from the top); it feeds the horizontal stack only after a one-row shift down,
  so the horizontal stack at row r gets rows < r only;
* the *horizontal* stack sees the current row left of the pixel (a 1 x (p+1) convolution padded
  from the left; the input layer excludes the pixel itself, later layers include their own column).

Each layer is a gated unit ``tanh(a) * sigmoid(b)``; the horizontal stack is residual and each layer
adds a 1x1 skip connection; the head is ReLU-1x1-ReLU-1x1 on the sum of the skips.

Receptive field: with ``p0 = input_kernel_size // 2`` and ``p = kernel_size // 2``, after ``L`` layers
the output at (r, c) sees its own row at columns [c - R, c - 1] and the rows [r - 1 - R, r - 1] at columns
[c - R, c + R], where ``R = p0 + (L - 1) * p``. It covers every earlier pixel of an H x W image iff
``R >= max(H - 2, W - 1)``, that is ``L >= min_layers(H, W, kernel_size, input_kernel_size)``
= ``1 + ceil((max(H - 2, W - 1) - p0) / p)`` (at least 1): e.g. 25 layers of 3x3 (or 13 of 5x5) after a
7x7 input layer for 28x28 images, 15 layers of 5x5 for 32x32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import NonNegativeInt, PositiveInt
from torch import Tensor, nn

from ardetect.configs import config_dataclass
from ardetect.models.base import ARModel, PixelLogitHead, label_bias, per_class


@config_dataclass
class GatedPixelCNNConfig:
    """``layers`` counts the input layer; for a receptive field that covers every earlier pixel of an
    H x W image it must be at least ``min_layers(H, W, kernel_size, input_kernel_size)`` (28x28 with the
    defaults: 13)."""

    channels: PositiveInt = 64
    layers: PositiveInt = 13
    kernel_size: PositiveInt = 5  # k of the gated layers: a (k//2+1) x k vertical, 1 x (k//2+1) horizontal
    input_kernel_size: PositiveInt = 7  # the same for the input layer
    head_channels: PositiveInt = 64
    num_classes: NonNegativeInt = 0  # > 0: class-conditional p(x | y), the label a per-channel bias per layer
    label_maps: bool = True  # conditional models: also a learned (ch, H, W) map per class at the head

    def __post_init__(self) -> None:
        for field in ("kernel_size", "input_kernel_size"):
            size = getattr(self, field)
            if size % 2 == 0 or size < 3:
                raise ValueError(f"{field} must be odd and at least 3, got {size}")


def min_layers(height: int, width: int, kernel_size: int = 5, input_kernel_size: int = 7) -> int:
    """Fewest layers (input layer included) whose receptive field covers every earlier pixel."""
    reach = max(height - 2, width - 1)  # columns/rows the field must reach from any position
    extra = reach - input_kernel_size // 2
    return 1 + max(0, math.ceil(extra / (kernel_size // 2)))


def gate(h: Tensor) -> Tensor:
    a, b = h.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(h: Tensor) -> Tensor:
    """Row r gets row r-1 (zeros in row 0): rows <= r become rows < r."""
    return F.pad(h, (0, 0, 1, 0))[:, :, :-1]


class GatedLayer(nn.Module):
    """One gated layer of both stacks; the input layer (``first``) hides the pixel itself, no residual."""

    def __init__(
        self, in_channels: int, channels: int, kernel_size: int, first: bool, num_classes: int = 0
    ) -> None:
        super().__init__()
        self.p, self.first = kernel_size // 2, first
        width = self.p if first else self.p + 1  # the input layer's row stops left of the pixel
        self.v_conv = nn.Conv2d(in_channels, 2 * channels, (self.p + 1, kernel_size))
        self.h_conv = nn.Conv2d(in_channels, 2 * channels, (1, width))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.skip = nn.Conv2d(channels, channels, 1)
        self.label = label_bias(num_classes, 4 * channels)  # V^T y inside both stacks' gates

    def forward(self, v: Tensor, h: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        p, w = self.p, h.shape[-1]
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0)))  # (B, 2ch, H, W): rows r-p..r, cols c-p..c+p
        h_pre = self.h_conv(F.pad(h, (p, 0)))[..., :w]  # (B, 2ch, H, W): row r, cols c-p..c (c-1 if first)
        if self.label is not None and y is not None:
            v_bias, h_bias = self.label(y)[:, :, None, None].chunk(2, dim=1)  # (B, 2ch, 1, 1) each
            v_pre, h_pre = v_pre + v_bias, h_pre + h_bias
        h_gated = gate(h_pre + self.v_to_h(shift_down(v_pre)))  # (B, ch, H, W)
        h_new = self.h_out(h_gated) if self.first else h + self.h_out(h_gated)  # (B, ch, H, W)
        return gate(v_pre), h_new, self.skip(h_gated)


class GatedPixelCNN(ARModel):
    name = "gated_pixelcnn"
    Config = GatedPixelCNNConfig
    single_channel_only = True

    def __init__(self, image_shape: Sequence[int], config: GatedPixelCNNConfig, levels: int = 2) -> None:
        super().__init__(image_shape, levels)
        self.config = config
        ch, k = config.channels, config.num_classes
        self.layers = nn.ModuleList(
            [GatedLayer(1, ch, config.input_kernel_size, True, k)]
            + [GatedLayer(ch, ch, config.kernel_size, False, k) for _ in range(config.layers - 1)]
        )
        # logits stored levels-last: 256-way cross-entropy over a contiguous dim, and the last 1x1 as one
        # addmm (8-bit training 106-113 -> 119-123 img/s, scoring 285-328 -> 344-349 on 2 cores)
        self.head = PixelLogitHead(ch, config.head_channels, levels, matmul_last=True)
        maps = torch.zeros(k, ch, *self.image_shape[1:]) if k and config.label_maps else None
        self.label_maps = nn.Parameter(maps) if maps is not None else None  # (K, ch, H, W)

    @property
    def covers_all_pixels(self) -> bool:
        """Whether every output sees every earlier pixel (``layers >= min_layers`` for this shape)."""
        _, height, width = self.image_shape
        cfg = self.config
        return cfg.layers >= min_layers(height, width, cfg.kernel_size, cfg.input_kernel_size)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Logits of p(x), or of p(x | y) for labels ``y`` (B,) when ``config.num_classes > 0``."""
        if self.config.num_classes and y is None:
            raise self.missing_labels()
        v = h = self.scale_input(x)  # (B, 1, H, W)
        v, h, skips = self.layers[0](v, h, y)  # (B, ch, H, W) each
        for layer in self.layers[1:]:
            v, h, skip = layer(v, h, y)  # (B, ch, H, W) each
            skips = skips + skip
        if self.label_maps is not None and y is not None:
            skips = skips + per_class(self.label_maps, y)  # location-dependent conditioning, (B, ch, H, W)
        return self.head(skips)  # (B, 1, H, W) or (B, levels, 1, H, W)
