"""NADE (Larochelle & Murray, 2011): hidden activations shared across conditionals, O(D*H) per image."""

from __future__ import annotations

import math
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

    strict_lower: Tensor

    def __init__(self, image_shape: Sequence[int], config: NADEConfig, levels: int = 2) -> None:
        super().__init__(image_shape, levels)
        self.config = config
        d, h = self.num_dims, config.hidden
        self.W = nn.Parameter(torch.randn(d, h) / d**0.5)  # input -> hidden, row i is pixel i's column
        self.c = nn.Parameter(torch.zeros(h))
        self.V = nn.Parameter(torch.randn(d, h) / h**0.5)  # hidden -> logit of pixel i
        self.b = nn.Parameter(torch.zeros(d))
        # Pixels are processed in blocks of K ~ sqrt(D): the shared running sum over earlier pixels is a
        # cumulative sum over blocks plus a small masked matmul inside each block. Same O(D*H) result
        # as the textbook recursion, without a (B, D, H) cumsum (slow, and memory-bound on CPU).
        self.block = max(1, math.isqrt(d - 1) + 1) if d > 1 else 1
        self.register_buffer("strict_lower", torch.tril(torch.ones(self.block, self.block), diagonal=-1))

    def forward(self, x: Tensor) -> Tensor:
        v = self.scale_input(x).flatten(1)  # (B, D)
        b, d = v.shape
        k = self.block
        nb = -(-d // k)
        vb = F.pad(v, (0, nb * k - d)).view(b, nb, k)  # (B, nb, K)
        wb = F.pad(self.W, (0, 0, 0, nb * k - d)).view(nb, k, -1)  # (nb, K, H)
        within = torch.matmul(vb.unsqueeze(2) * self.strict_lower, wb)  # (B, nb, K, H): earlier in block
        totals = torch.einsum("bnk,nkh->bnh", vb, wb)  # (B, nb, H): each block's whole contribution
        before = F.pad(totals.cumsum(1)[:, :-1], (0, 0, 1, 0))  # (B, nb, H): all earlier blocks
        a = (self.c + before.unsqueeze(2) + within).reshape(b, nb * k, -1)[:, :d]  # (B, D, H)
        logits = torch.einsum("bdh,dh->bd", torch.sigmoid(a), self.V) + self.b  # (B, D)
        return logits.view(x.shape)  # (B, C, H, W)
