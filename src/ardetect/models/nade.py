"""NADE (Larochelle & Murray, 2011): hidden activations shared across conditionals, O(D*H) per image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import Tensor, nn

from ardetect.configs import config_dataclass
from ardetect.models.base import ARModel


@config_dataclass
class NADEConfig:
    hidden: PositiveInt = 500


class NADE(ARModel):
    name = "nade"
    supported_levels = (2,)
    Config = NADEConfig

    def __init__(self, image_shape: Sequence[int], config: NADEConfig, levels: int = 2) -> None:
        super().__init__(image_shape, levels)
        self.config = config
        d, h = self.num_dims, config.hidden
        self.W = nn.Parameter(torch.randn(d, h) / d**0.5)  # input -> hidden, row i is pixel i's column
        self.c = nn.Parameter(torch.zeros(h))
        self.V = nn.Parameter(torch.randn(d, h) / h**0.5)  # hidden -> logit of pixel i
        self.b = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        v = self.scale_input(x).flatten(1)  # (B, D)
        contrib = v.unsqueeze(-1) * self.W  # (B, D, H): pixel j's share of every hidden pre-activation
        # a_i = c + sum_{j<i} W_j x_j: an exclusive running sum, so pixel i never sees itself.
        a = self.c + F.pad(contrib.cumsum(1)[:, :-1], (0, 0, 1, 0))  # (B, D, H)
        logits = (torch.sigmoid(a) * self.V).sum(-1) + self.b  # (B, D)
        return logits.view(x.shape)  # (B, C, H, W)
