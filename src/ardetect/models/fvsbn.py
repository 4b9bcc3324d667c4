"""Fully visible sigmoid belief network: one logistic regression per pixel on all earlier pixels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ardetect.configs import config_dataclass
from ardetect.models.base import ARModel, MaskedLinear


@config_dataclass
class FVSBNConfig:
    """FVSBN has no hyperparameters beyond the image shape."""


class FVSBN(ARModel):
    name = "fvsbn"
    supported_levels = (2,)
    Config = FVSBNConfig

    def __init__(self, image_shape: Sequence[int], config: FVSBNConfig, levels: int = 2) -> None:
        super().__init__(image_shape, levels)
        self.config = config
        d = self.num_dims
        self.linear = MaskedLinear(d, d)
        self.linear.set_mask(torch.tril(torch.ones(d, d), diagonal=-1))  # strictly earlier pixels
        torch.nn.init.zeros_(self.linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = self.scale_input(x).flatten(1)  # (B, D)
        return self.linear(h).view(x.shape)  # (B, C, H, W)
