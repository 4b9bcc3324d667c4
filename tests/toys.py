"""Toy data and tiny models shared by the test modules (one place instead of a copy per file).

``TINY`` holds, for every registered architecture, hyperparameters small enough for exhaustive checks;
``MODEL_CASES`` crosses ``ardetect.models.REGISTRY`` with each architecture's ``supported_levels``, so a
newly registered model enters the causality, normalisation and sampling suites by itself
(``tests/test_models.py::test_every_registered_arch_has_a_tiny_config`` fails until it gets a row here).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ardetect.models import REGISTRY, ARModel, build_model


@dataclass(frozen=True)
class Tiny:
    """A tiny configuration of one architecture and what its causality test may demand of it."""

    hparams: dict[str, Any] = field(default_factory=dict)
    #: which earlier inputs every output must depend on: "all" (dense, no blind spot), "some" (a
    #: receptive field with a blind spot) or "maybe" (sparse random masks may drop every one)
    sees_earlier: Literal["all", "some", "maybe"] = "all"


# 4 gated layers of 3x3 cover every earlier pixel of 3x3 and 4x5 images: min_layers(4, 5, 3, 3) == 4
TINY: dict[str, Tiny] = {
    "fvsbn": Tiny(),
    "nade": Tiny({"hidden": 7}),
    "made": Tiny({"hidden": [16], "num_masks": 3, "natural_ordering": False, "seed": 4}, "maybe"),
    "rnn": Tiny({"hidden": 12, "layers": 2, "embed": 6}),
    "pixelcnn": Tiny({"channels": 8, "blocks": 2, "head_channels": 8}, "some"),
    "gated_pixelcnn": Tiny(dict(channels=6, layers=4, kernel_size=3, input_kernel_size=3, head_channels=8)),
    "transformer": Tiny({"d_model": 16, "heads": 2, "layers": 2}),
    # two resolutions (3x3 -> 2x2, 4x5 -> 2x3, 1x2 -> 1x1): the down- and up-sampling paths are exercised
    "pixelcnnpp": Tiny({"filters": 4, "resnets_per_stage": 1, "stages": 2, "mixtures": 2}),
}


def model_cases() -> list[tuple[str, int]]:
    """(architecture, levels) for every registered architecture and each level count it supports."""
    return [(name, levels) for name in sorted(REGISTRY) for levels in REGISTRY[name].supported_levels]


MODEL_CASES = model_cases()
MODEL_IDS = [f"{name}-{levels}" for name, levels in MODEL_CASES]


def randomize(model: torch.nn.Module, gain: float = 1.0) -> None:
    """Fresh random weights everywhere (biases and norms too; some models zero-initialise, which would
    hide dependencies), scaled by fan-in so deep models stay in a sane range."""
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn_like(p) * gain / math.sqrt(fan_in))


def tiny_model(name: str, shape: tuple[int, int, int], levels: int = 2) -> ARModel:
    """``name`` with its ``TINY`` hyperparameters (its defaults if it has none), random weights, eval mode."""
    model = build_model(name, shape, levels=levels, **TINY.get(name, Tiny()).hparams)
    randomize(model)
    return model.eval()


def all_images(shape: tuple[int, int, int], levels: int) -> Tensor:
    """Every image of ``shape`` with pixels in ``[0, levels)``: (levels**D, C, H, W), lexicographic."""
    d = math.prod(shape)
    grid = torch.tensor(list(itertools.product(range(levels), repeat=d)), dtype=torch.float32)
    return grid.view(-1, *shape)


def random_levels(n: int, shape: tuple[int, ...], levels: int) -> Tensor:
    return torch.randint(0, levels, (n, *shape)).float()


def row_copies(n: int, seed: int) -> Tensor:
    """Binary 4x4 images with strong structure: each row copies its first pixel, 5% of pixels flipped.
    A model that learns anything beats the uniform NLL on them by far."""
    g = torch.Generator().manual_seed(seed)
    first = torch.bernoulli(torch.full((n, 1, 4, 1), 0.5), generator=g)
    noise = torch.bernoulli(torch.full((n, 1, 4, 4), 0.05), generator=g)
    return (first.expand(n, 1, 4, 4) + noise) % 2


def stripes() -> Tensor:
    """Eight binary 8x8 stripe images (periods 2-5, horizontal and vertical): (8, 1, 8, 8)."""
    rows = torch.arange(8)
    lines = [(rows % p == 0).float() for p in (2, 3, 4, 5)]
    images = [s[:, None].expand(8, 8) for s in lines] + [s[None, :].expand(8, 8) for s in lines]
    return torch.stack(images).unsqueeze(1)


def digits_gray() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as uint8 gray images (N, 1, 8, 8) and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    gray = np.rint(data.images * 255.0 / 16.0).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    return gray, data.target.astype(np.int64)


def dependence(model: ARModel, x: torch.Tensor, pos: int) -> torch.Tensor:
    """Which inputs (flat index) the logits at flat position ``pos`` have a nonzero gradient for."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    out = logits.flatten(1)[:, pos] if model.levels == 2 else logits.flatten(2)[:, :, pos]  # (B,) | (B, L)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(pos))  # no lucky cancellation
    (grad,) = torch.autograd.grad((out * weight).sum(), x)
    return grad.abs().sum(0).flatten() > 0  # (D,)
