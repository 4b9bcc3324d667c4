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

    #: pixels per block of the kernel (at most ``block``): the within-block matmul costs ~2*K FLOPs per
    #: hidden activation and the block prefixes ~D/K; 14 was fastest for 28x28, H = 128 on a 2-core CPU.
    kernel_block = 14
    #: images per chunk: one chunk's (D, H) activations (~1.6 MB for 4 images of 28x28, H = 128) stay in
    #: the L2 cache from the matmul that makes them through tanh to the contraction with V.
    chunk_images = 4
    chunks_per_step = 2

    def forward(self, x: Tensor) -> Tensor:
        """Logits of all D conditionals in one pass, the (B, D, H) activations made a chunk at a time.

        ``sigmoid(a) = (1 + tanh(a / 2)) / 2``, so the logit ``b + V . sigmoid(a)`` is computed as
        ``b + sum(V) / 2 + (V / 2) . tanh(a / 2)`` with ``a / 2`` from ``W / 2`` and ``c / 2``: tanh is
        cheaper than sigmoid on the CPU and this folds the affine parts into the small weights.
        """
        v = self.scale_input(x).flatten(1)  # (B, D)
        n, d = v.shape
        k, bc = min(self.kernel_block, self.block), self.chunk_images
        nb, nc = -(-d // k), -(-n // bc)
        h = self.c.shape[0]
        w = F.pad(self.W * 0.5, (0, 0, 0, nb * k - d)).view(nb, k, h)  # (nb, K, H)
        vt = F.pad(self.V * 0.5, (0, 0, 0, nb * k - d)).view(nb, k, h).transpose(1, 2)  # (nb, H, K)
        vb = F.pad(v, (0, nb * k - d, 0, nc * bc - n)).view(nc, bc, nb, k).transpose(1, 2)  # (nc, nb, bc, K)
        vb = vb.contiguous()
        # Each block's start, a / 2 at its first pixel: c / 2 plus every earlier block's contribution.
        totals = torch.matmul(vb, w)  # (nc, nb, bc, H)
        earlier = torch.ones(nb, nb, dtype=w.dtype, device=w.device).tril(-1)  # (nb, nb)
        starts = torch.matmul(earlier, totals.view(nc, nb, bc * h)).view(nc, nb, bc, h) + self.c * 0.5
        # Within a block, pixel k adds the earlier pixels j < k: rows (k, image) of a masked matmul.
        lower = self.strict_lower[:k, :k].reshape(k, 1, k)
        within = (vb.unsqueeze(2) * lower).view(nc, nb, k * bc, k)  # (nc, nb, K*bc, K)
        out = []
        g = self.chunks_per_step
        for i in range(0, nc, g):
            a = starts[i : i + g].unsqueeze(2).expand(-1, nb, k, bc, h).reshape(-1, k * bc, h)  # (g*nb, K*bc, H)
            act = a.baddbmm_(within[i : i + g].reshape(-1, k * bc, k), w.repeat(min(g, nc - i), 1, 1)).tanh_()
            dots = torch.bmm(act, vt.repeat(min(g, nc - i), 1, 1)).view(-1, nb, k, bc, k)
            out.append(dots.diagonal(dim1=2, dim2=4))  # (g, nb, bc, K): each pixel against its own V
        logits = torch.cat(out).transpose(1, 2).reshape(nc * bc, nb * k)[:n, :d]  # (B, D)
        return (logits + self.b + 0.5 * self.V.sum(1)).view(x.shape)  # (B, C, H, W)
