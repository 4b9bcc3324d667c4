"""PixelCNN++ (Salimans et al., 2017), PixelDefend's density model, for single-channel 8-bit images.

Two streams of shifted convolutions replace masked ones:

* ``u`` (down-shifted): ``(2, 3)`` convolutions padded from the top; after the input layer's one-row
  shift, ``u`` at row r depends on rows < r only;
* ``ul`` (down-right-shifted): ``(2, 2)`` convolutions padded from the top and the left; after the input
  layer's shifts it depends on the pixels strictly before (r, c) in raster order, and it also reads ``u``
  at its own position.

Each block is a gated resnet ``x + a * sigmoid(b)`` with ``(a, b) = conv(concat_elu(conv(concat_elu(x))
+ nin(concat_elu(extra))))`` (dropout after the inner nonlinearity). The network is a U-net over
``stages`` resolutions: the down-sampling pass runs ``resnets_per_stage`` blocks per resolution and halves
it with stride-2 shifted convolutions (sizes rounded up: ``ceil(H / 2)``); the up-sampling pass doubles it
with stride-2 shifted transposed convolutions (cropped back to the finer size) and runs
``resnets_per_stage`` blocks at the coarsest resolution and one more at every other, each reading one
saved output of the down-sampling pass at its resolution (the paper's "up pass" and "down pass" are this
file's down- and up-sampling passes). Position (i, j) of a coarser map stands for (2i, 2j) of the finer
one and depends only on pixels strictly before it, so every shift stays causal at every size.
The input is mapped to [-1, 1], with a channel of ones so the first layers tell zero padding from black.

Receptive field: no blind spot, but finite. A coarse position (i, j) stands for (2i, 2j), so on an odd
row r the rest of row r - 1 (from column 2 floor(c/2) on) and row r itself reach the output at (r, c)
only through the full-resolution layers: ``4 * resnets_per_stage + 2`` columns to the right on row
r - 1 and to the left on row r (stages >= 2). Every earlier pixel of a W-wide image is seen only when
that reaches W - 1: at 28x28 from ``resnets_per_stage = 7`` on (checked by gradients with 2 and 3
stages); the paper's 5 leaves 140 of the 784 outputs without some earlier pixel, the CPU default (1)
511 (still an exact density: those conditionals just read fewer pixels, as PixelCNN's behind its blind
spot). tests/test_pixelcnnpp.py checks both sides on 8x8.

Each pixel's conditional is a mixture of ``mixtures`` discretized logistics over the 256 levels
(:func:`logistic_mixture_log_prob`); ``forward`` returns its 256 log-probabilities as the categorical
logits of the ``ARModel`` contract, so the shared sampling, purification and compression use it
unchanged, while ``log_prob`` (training, ``bpd``, scoring) evaluates the mixture at the observed levels
only: the same value up to float rounding, with 256x less work. Not done here: the paper's RGB channel
coupling (single-channel only) and weight normalisation with data-dependent initialisation (plain
convolutions; the last convolution of each block starts at 0.1 of PyTorch's default scale, as the
paper's ``init_scale=0.1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from ardetect.configs import config_dataclass
from ardetect.models.base import ARModel

LEVELS = 256
MIN_LOG_SCALE = -7.0  # the paper's lower bound on the logistics' log-scales


@config_dataclass
class PixelCNNPPConfig:
    """Defaults: a small CPU size. The paper's CIFAR-10 model: 160 filters, 5 resnets per stage, 3 stages,
    10 mixtures, dropout 0.5."""

    filters: PositiveInt = 32  # channels of both streams
    resnets_per_stage: PositiveInt = 1  # nr_resnet: gated resnet blocks per resolution and pass
    stages: PositiveInt = 3  # resolutions (28x28 -> 14x14 -> 7x7 with 3)
    mixtures: PositiveInt = 5  # nr_logistic_mix
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


# --- the discretized logistic mixture -----------------------------------------------------------------


SERIES_BELOW = 1e-3  # standardised bin widths below this use the series (error < d^4 / 2880 < 4e-16)


def _scale(log_scale: Tensor) -> tuple[Tensor, Tensor]:
    """1 / scale for the clamped log-scale, and ``log(1 - exp(-d))`` for the standardised bin width
    ``d = (2/255) / scale``: accurate, with finite gradients, for every d > 0, even where d underflows.

    Three ranges, each branch clamped to its own so the branches ``where`` drops stay finite and their
    zero gradients never turn into NaN: ``log1p(-exp(-d))`` from ln 2 up and ``log(-expm1(-d))`` below
    (Mächler 2012); below 1e-3 the series ``log d - d/2 + d^2/24`` with ``log d = log(2/255) - log_scale``
    taken from the log-scale itself, which never underflows and never divides by a tiny d.
    """
    log_scale = log_scale.clamp(min=MIN_LOG_SCALE)
    inv_scale = torch.exp(-log_scale)
    log_d = math.log(2.0 / (LEVELS - 1)) - log_scale
    d = torch.exp(log_d)
    cut = math.log(2.0)
    tiny = d.clamp(max=SERIES_BELOW)
    series = log_d + tiny * (tiny / 24.0 - 0.5)
    small = torch.log(-torch.expm1(-d.clamp(SERIES_BELOW, cut)))
    large = torch.log1p(-torch.exp(-d.clamp(min=cut)))
    return inv_scale, torch.where(d < SERIES_BELOW, series, torch.where(d < cut, small, large))


def discretized_logistic_log_prob(k: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(X = k) of one logistic(mean, exp(log_scale)) on [-1, 1] discretized into 256 bins (broadcast).

    Level k is centred at ``x = 2k/255 - 1``, its bin is ``[x - 1/255, x + 1/255]``; level 0 takes the
    whole mass below its upper edge and level 255 the whole mass above its lower edge (the paper's edge
    cases), so the 256 probabilities sum to 1. Log-scales are clamped at -7, as in the paper.

    The paper subtracts the two CDFs in float32 and, where the difference is below 1e-5, falls back to
    the density at the bin's mid-point times the bin width. Here the difference is taken in log space
    instead, from the identity ``σ(a) - σ(b) = σ(a) σ(-b) (1 - exp(-d))`` with ``a``, ``b`` the
    standardised upper and lower edges and ``d = a - b = (2/255) / scale``: two log-sigmoids plus
    ``log(1 - exp(-d))`` (:func:`_scale`), with no cancellation and no underflow however far in a tail the
    bin lies and however small or large the scale. The mid-point rule survives as the small-d end: there
    ``log σ(a) + log σ(-b) + log d`` is the log density at the bin times its width, and ``_scale`` adds the
    series' next two terms, so it is exact to float precision.
    """
    inv_scale, log_width = _scale(log_scale)
    upper = ((2 * k + 1) / (LEVELS - 1) - 1.0 - mean) * inv_scale  # a (the same float ops as the edges of
    lower = ((2 * k - 1) / (LEVELS - 1) - 1.0 - mean) * inv_scale  # b  discretized_logistic_levels)
    log_cdf_upper = F.logsigmoid(upper)  # log σ(a): level 0
    log_sf_lower = F.logsigmoid(-lower)  # log σ(-b): level 255
    interior = log_cdf_upper + log_sf_lower + log_width
    return torch.where(k <= 0, log_cdf_upper, torch.where(k >= LEVELS - 1, log_sf_lower, interior))


def discretized_logistic_levels(mean: Tensor, log_scale: Tensor) -> Tensor:
    """:func:`discretized_logistic_log_prob` at all 256 levels, (B, 1, H, W) each -> (B, 256, H, W).

    The same formula, the same float operations on each edge (so the same numbers), with the
    log-sigmoids computed once per bin edge (255 edges, shared by neighbouring levels) and no level-wise
    selection: about half the elementwise work.
    """
    inv_scale, log_width = _scale(log_scale)
    odd = torch.arange(1, 2 * LEVELS - 1, 2, device=mean.device, dtype=mean.dtype)  # 2k + 1, k = 0..254
    edges = odd / (LEVELS - 1) - 1.0
    z = (edges.view(1, -1, 1, 1) - mean) * inv_scale  # (B, 255, H, W): standardised upper edge of 0..254
    log_cdf, log_sf = F.logsigmoid(z), F.logsigmoid(-z)
    interior = log_cdf[:, 1:] + log_sf[:, :-1] + log_width  # levels 1..254: upper edge k, lower edge k - 1
    return torch.cat([log_cdf[:, :1], interior, log_sf[:, -1:]], dim=1)


def logistic_mixture_log_prob(params: Tensor, k: Tensor | None = None) -> Tensor:
    """log P(X = k) under the mixture ``params`` (B, 3M, H, W) = (weight logits, means, log-scales):
    at the levels ``k`` (B, 1, H, W) -> (B, 1, H, W), or at every level (``k=None``) -> (B, 256, H, W).

    At least float32 whatever the parameters' dtype (autocast; float64 stays float64); one component at a
    time, so all 256 levels take a few (B, 256, H, W) tensors, not M of them.
    """
    params = params.to(torch.promote_types(params.dtype, torch.float32))
    logits, means, log_scales = params.chunk(3, dim=1)  # (B, M, H, W) each
    log_weights = torch.log_softmax(logits, dim=1)
    out: Tensor | None = None
    for m in range(means.shape[1]):
        mean, log_scale = means[:, m : m + 1], log_scales[:, m : m + 1]  # (B, 1, H, W)
        if k is None:
            log_p = discretized_logistic_levels(mean, log_scale)
        else:
            log_p = discretized_logistic_log_prob(k.to(params.dtype), mean, log_scale)
        comp = log_weights[:, m : m + 1] + log_p
        out = comp if out is None else torch.logaddexp(out, comp)
    assert out is not None
    return out


# --- shifted convolutions -----------------------------------------------------------------------------


def down_shift(h: Tensor) -> Tensor:
    """Row r gets row r - 1 (zeros in row 0)."""
    return F.pad(h, (0, 0, 1, 0))[:, :, :-1]


def right_shift(h: Tensor) -> Tensor:
    """Column c gets column c - 1 (zeros in column 0)."""
    return F.pad(h, (1, 0))[..., :-1]


class DownShiftedConv(nn.Conv2d):
    """A (kh, kw) convolution that sees rows r - kh + 1..r and columns c - kw//2..c + kw//2 (stride s:
    output (i, j) is centred on input (s i, s j)); ``ceil(size / s)`` outputs per dimension."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int] = (2, 3), stride: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = self.kernel_size
        return super().forward(F.pad(x, ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)))


class DownRightShiftedConv(nn.Conv2d):
    """A (kh, kw) convolution that sees rows r - kh + 1..r and columns c - kw + 1..c."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int] = (2, 2), stride: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = self.kernel_size
        return super().forward(F.pad(x, (kw - 1, 0, kh - 1, 0)))


class DownShiftedDeconv(nn.ConvTranspose2d):
    """Stride-2 (2, 3) transposed convolution: input (i, j) feeds rows 2i, 2i + 1 and columns 2j - 1..2j + 1,
    cropped to ``size``."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, (2, 3), stride=2)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:  # type: ignore[override]
        return super().forward(x)[:, :, : size[0], 1 : size[1] + 1]


class DownRightShiftedDeconv(nn.ConvTranspose2d):
    """Stride-2 (2, 2) transposed convolution: input (i, j) feeds its 2x2 block at (2i, 2j), cropped."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, (2, 2), stride=2)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:  # type: ignore[override]
        return super().forward(x)[:, :, : size[0], : size[1]]


def concat_elu(h: Tensor) -> Tensor:
    """ELU of (h, -h) along channels: (B, 2C, H, W)."""
    return F.elu(torch.cat([h, -h], dim=1))


ShiftedConv = type[DownShiftedConv] | type[DownRightShiftedConv]


class GatedResnet(nn.Module):
    """``h + a * sigmoid(b)``, ``(a, b)`` from two shifted convolutions of ``h`` (and a 1x1 of ``extra``)."""

    def __init__(self, filters: int, conv: ShiftedConv, extra: int, dropout: float) -> None:
        super().__init__()
        self.conv_in = conv(2 * filters, filters)
        self.extra = nn.Conv2d(2 * extra, filters, 1) if extra else None
        self.dropout = nn.Dropout(dropout)
        self.conv_out = conv(2 * filters, 2 * filters)
        with torch.no_grad():  # the paper's init_scale=0.1: blocks start close to the identity
            self.conv_out.weight.mul_(0.1)

    def forward(self, h: Tensor, extra: Tensor | None = None) -> Tensor:
        c = self.conv_in(concat_elu(h))  # (B, F, H, W)
        if self.extra is not None and extra is not None:
            c = c + self.extra(concat_elu(extra))
        a, b = self.conv_out(self.dropout(concat_elu(c))).chunk(2, dim=1)
        return h + a * torch.sigmoid(b)


Streams = tuple[Tensor, Tensor]  # (u, ul), each (B, F, h, w)


class StreamBlock(nn.Module):
    """A gated resnet on each stream: ``u`` from ``u``, ``ul`` from ``ul`` and the new ``u``; in the
    up-sampling pass (``skip``) each also reads its stream's saved output of the down-sampling pass."""

    def __init__(self, filters: int, dropout: float, skip: bool) -> None:
        super().__init__()
        self.u = GatedResnet(filters, DownShiftedConv, filters if skip else 0, dropout)
        self.ul = GatedResnet(filters, DownRightShiftedConv, (2 if skip else 1) * filters, dropout)

    def forward(self, u: Tensor, ul: Tensor, saved: Streams | None = None) -> Streams:
        if saved is None:
            u = self.u(u)
            return u, self.ul(ul, u)
        u = self.u(u, saved[0])
        return u, self.ul(ul, torch.cat([u, saved[1]], dim=1))


class Downsample(nn.Module):
    """Stride-2 shifted convolutions of both streams: (h, w) -> (ceil(h / 2), ceil(w / 2))."""

    def __init__(self, filters: int) -> None:
        super().__init__()
        self.u = DownShiftedConv(filters, filters, (2, 3), stride=2)
        self.ul = DownRightShiftedConv(filters, filters, (2, 2), stride=2)

    def forward(self, u: Tensor, ul: Tensor) -> Streams:
        return self.u(u), self.ul(ul)


class Upsample(nn.Module):
    """Stride-2 shifted transposed convolutions of both streams, cropped to ``size`` (the finer stage's)."""

    def __init__(self, filters: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.u, self.ul, self.size = DownShiftedDeconv(filters), DownRightShiftedDeconv(filters), size

    def forward(self, u: Tensor, ul: Tensor) -> Streams:
        return self.u(u, self.size), self.ul(ul, self.size)


class PixelCNNPP(ARModel):
    name = "pixelcnnpp"
    Config = PixelCNNPPConfig
    single_channel_only = True
    supported_levels = (LEVELS,)

    def __init__(self, image_shape: Sequence[int], config: PixelCNNPPConfig, levels: int = LEVELS) -> None:
        super().__init__(image_shape, levels)
        self.config = config
        f, n, stages, p = config.filters, config.resnets_per_stage, config.stages, config.dropout
        self.u_in = DownShiftedConv(2, f, (2, 3))  # shifted down after: rows above
        self.ul_in_up = DownShiftedConv(2, f, (1, 3))  # shifted down after: the row above
        self.ul_in_left = DownRightShiftedConv(2, f, (2, 1))  # shifted right after: the pixel to the left
        _, height, width = self.image_shape
        self.sizes = [(height, width)]  # each stage's resolution, rounded up
        for _ in range(stages - 1):
            h, w = self.sizes[-1]
            self.sizes.append(((h + 1) // 2, (w + 1) // 2))
        down: list[nn.Module] = []  # every step's output is saved for the up-sampling pass
        for s in range(stages):
            down += [Downsample(f)] if s else []
            down += [StreamBlock(f, p, skip=False) for _ in range(n)]
        up: list[nn.Module] = []  # n blocks at the coarsest stage, n + 1 at the others: one per saved output
        for s in reversed(range(stages)):
            up += [Upsample(f, self.sizes[s])] if s < stages - 1 else []
            up += [StreamBlock(f, p, skip=True) for _ in range(n if s == stages - 1 else n + 1)]
        self.down, self.up = nn.ModuleList(down), nn.ModuleList(up)
        self.head = nn.Conv2d(f, 3 * config.mixtures, 1)

    def mixture_params(self, x: Tensor) -> Tensor:
        """Each pixel's mixture given the pixels before it, (B, 3M, H, W): weight logits, means, scales."""
        x = 2.0 * self.scale_input(x) - 1.0  # (B, 1, H, W) in [-1, 1]
        x = torch.cat([x, torch.ones_like(x)], dim=1)  # (B, 2, H, W)
        u = down_shift(self.u_in(x))  # (B, F, H, W): rows < r
        ul = down_shift(self.ul_in_up(x)) + right_shift(self.ul_in_left(x))  # before (r, c)
        saved = [(u, ul)]
        for step in self.down:
            u, ul = step(u, ul)
            saved.append((u, ul))
        u, ul = saved.pop()
        for step in self.up:
            u, ul = step(u, ul) if isinstance(step, Upsample) else step(u, ul, saved.pop())
        assert not saved
        return self.head(F.elu(ul))  # (B, 3M, H, W)

    def forward(self, x: Tensor) -> Tensor:
        """Log-probabilities of the 256 levels of every pixel, normalised: (B, 256, 1, H, W)."""
        return logistic_mixture_log_prob(self.mixture_params(x)).unsqueeze(2)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """log p(x) in nats, (B,): the mixture evaluated at the observed levels only, 256x less work than
        ``forward``'s every level (equal to the shared ``log_prob`` up to float rounding; training and
        scoring run this)."""
        self.check_input(x)
        self.sample_labels(x.shape[0], y, x.device)  # unconditional: labels are an error
        return logistic_mixture_log_prob(self.mixture_params(x), x).flatten(1).sum(1)
