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
        # Pixels are processed in blocks: the shared running sum over earlier pixels is a sum over earlier
        # blocks plus a small masked matmul inside each block. Same O(D*H) result as the textbook
        # recursion, without a (B, D, H) cumsum (slow, and memory-bound on CPU). The mask is a buffer
        # (in checkpoints) of side ~sqrt(D); forward uses its top-left kernel_block corner.
        self.block = max(1, math.isqrt(d - 1) + 1) if d > 1 else 1
        self.register_buffer("strict_lower", torch.tril(torch.ones(self.block, self.block), diagonal=-1))

    #: pixels per block in ``forward`` (at most ``block``): the masked matmul inside a block costs ~2K FLOPs
    #: per hidden activation; 14 was fastest for 28x28 images and H = 128 on a 2-core CPU.
    kernel_block = 14
    #: images per chunk: a chunk's (D, H) activations (6.4 MB for 16 images of 28x28, H = 128) go from
    #: the matmul that makes them through sigmoid to the contraction with V while still in cache.
    chunk_images = 16

    #: smallest batch that ``forward`` streams (CPU, no gradient): the streaming path issues three ops
    #: per pixel, so for fewer images (sampling draws 16) dispatch costs more than the blocked kernel's
    #: extra FLOPs; the crossover was ~32-64 images for 28x28 images and H = 128 on one core.
    stream_min_batch = 64

    def forward(self, x: Tensor) -> Tensor:
        """Logits of all D conditionals in one pass; the (B, D, H) activations never exist in full.

        Scoring (see ``streams``) takes ``streamed_logits``, training ``blocked_logits``: one function,
        two kernels. Both use ``sigmoid``, as the paper does: with torch 2.14 on a 2-core AMD EPYC (AVX-512)
        it is 6x faster than ``tanh`` (512x128 floats, one core: 28 vs 168 us), so the former rewrite
        ``sigmoid(a) = (1 + tanh(a / 2)) / 2`` cost NADE most of its scoring time (4,709 -> 11,000 img/s).
        """
        v = self.scale_input(x).flatten(1)  # (B, D)
        if self.streams(v):
            return self.streamed_logits(v).view(x.shape)  # (B, C, H, W)
        return (self.blocked_logits(v) + self.b).view(x.shape)  # (B, C, H, W)

    def streams(self, v: Tensor) -> bool:
        """Whether ``forward`` takes the streaming path for the inputs ``v`` (B, D): on the CPU, for a
        batch of at least ``stream_min_batch`` images, when autograd is off (scoring runs under
        ``no_grad``/``inference_mode``). Autograd through its 3·D small ops would be slow, and a GPU
        prefers the blocked kernel's few large ones."""
        return not torch.is_grad_enabled() and v.device.type == "cpu" and v.shape[0] >= self.stream_min_batch

    def streamed_logits(self, v: Tensor) -> Tensor:
        """Logits (B, D) by the textbook recursion, one pixel per step and the whole batch per op:
        ``a_i = a_(i-1) + v_(i-1) W_(i-1)`` (an in-place addcmul) and ``logit_i = b_i + V_i . sigmoid(a_i)``
        (sigmoid, then a matrix-vector product). The minimum O(D*H) FLOPs per image, and one (B, H) tensor of
        activations that stays in cache; the blocked kernel spends ~K times more on its masked matmuls
        and V contraction. ~3x the blocked kernel's scoring throughput for 512 28x28 images, H = 128."""
        n, d = v.shape
        w, vh = self.W.unbind(0), self.V.unbind(0)  # D x (H,)
        pixels = v.t().contiguous().unsqueeze(2).unbind(0)  # D x (B, 1)
        logits = self.b.unsqueeze(1).repeat(1, n)  # (D, B): the biases
        a = self.c.expand(n, -1).clone()  # (B, H): the pre-activations at pixel 0
        t = torch.empty_like(a)  # (B, H)
        for i, row in enumerate(logits.unbind(0)):
            row.addmv_(torch.sigmoid(a, out=t), vh[i])  # (B,)
            if i + 1 < d:
                a.addcmul_(pixels[i], w[i])  # (B, H): the pre-activations at pixel i + 1
        return logits.t().contiguous()  # (B, D)

    def blocked_logits(self, v: Tensor) -> Tensor:
        """Logits (B, D) less the biases ``b``, from blocks of pixels: a running sum over earlier blocks, a
        masked matmul inside each block, and a bmm with V. Few large ops: autograd's backward is cheap."""
        n, d = v.shape
        k, bc, h = min(self.kernel_block, self.block), self.chunk_images, self.c.shape[0]
        nb, nc = -(-d // k), -(-n // bc)  # pixel blocks, image chunks
        w = F.pad(self.W, (0, 0, 0, nb * k - d)).view(nb, k, h)  # (nb, K, H)
        vt = F.pad(self.V, (0, 0, 0, nb * k - d)).view(nb, k, h).transpose(1, 2)  # (nb, H, K)
        vb = F.pad(v, (0, nb * k - d, 0, nc * bc - n)).view(nc, bc, nb, k).transpose(1, 2)
        vb = vb.contiguous()  # (nc, nb, bc, K)
        # the pre-activations at each block's first pixel: c plus the contribution of every earlier block
        earlier = torch.ones(nb, nb, dtype=w.dtype, device=w.device).tril(-1)  # (nb, nb)
        totals = torch.matmul(vb, w).view(nc, nb, bc * h)  # (nc, nb, bc*H)
        starts = torch.matmul(earlier, totals).view(nc, nb, 1, bc, h) + self.c  # (nc, nb, 1, bc, H)
        # inside a block, pixel k adds pixels j < k: one masked matmul with rows (k, image) per block
        lower = self.strict_lower[:k, :k].reshape(k, 1, k)
        within = (vb.unsqueeze(2) * lower).reshape(nc, nb * k * bc, k)  # (nc, nb*K*bc, K)
        # One chunk per thread and step: bmm and sigmoid split the batch of blocks evenly across threads,
        # so each thread's chunk stays in its core's cache; the GPU takes every chunk in one step.
        g = torch.get_num_threads() if v.device.type == "cpu" else nc
        ws, vts = w.repeat(g, 1, 1), vt.repeat(g, 1, 1)  # (g*nb, K, H), (g*nb, H, K)
        out = []
        for i in range(0, nc, g):
            m = min(g, nc - i) * nb  # blocks in this step
            a = starts[i : i + g].expand(-1, -1, k, -1, -1).reshape(m, k * bc, h)  # (m, K*bc, H)
            act = a.baddbmm_(within[i : i + g].reshape(m, k * bc, k), ws[:m]).sigmoid_()  # (m, K*bc, H)
            dots = torch.bmm(act, vts[:m]).view(-1, nb, k, bc, k)  # (g, nb, K, bc, K): rows x all V
            out.append(dots.diagonal(dim1=2, dim2=4))  # (g, nb, bc, K): each pixel x its own V
        return torch.cat(out).transpose(1, 2).reshape(nc * bc, nb * k)[:n, :d]  # (B, D)
