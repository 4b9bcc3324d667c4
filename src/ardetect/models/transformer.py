"""Decoder-only causal transformer over the pixel sequence in raster order (a small Image GPT).

The sequence is shifted right behind a learned start token, so the token that predicts position i
carries pixels 0..i-1; causal attention keeps it that way through every layer. Each token is the
previous pixel's scaled level through a linear embedding plus a learned position embedding; blocks
are pre-LayerNorm (attention, then a 4x GELU MLP), with a final LayerNorm before the head.
Sampling keeps a key/value cache per layer, so it costs D single-token steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, cast

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveInt
from torch import Tensor, nn

from ardetect.configs import config_dataclass
from ardetect.models.base import ARModel, shift_right


@config_dataclass
class TransformerConfig:
    d_model: PositiveInt = 128
    heads: PositiveInt = 4
    layers: PositiveInt = 4
    dropout: Annotated[NonNegativeFloat, Field(lt=1.0)] = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")


class Block(nn.Module):
    """Pre-LN transformer block; ``forward`` for whole sequences, ``step`` for one cached token."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def split_heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)  # (B, T, d) each
        return tuple(z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # type: ignore[return-value]

    def finish(self, h: Tensor, att: Tensor) -> Tensor:
        """Merge heads, project, and add the MLP: both residuals of the block."""
        att = att.transpose(1, 2).reshape(h.shape)  # (B, T, d)
        h = h + self.drop(self.proj(att))  # (B, T, d)
        return h + self.drop(self.mlp(self.ln2(h)))  # (B, T, d)

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = self.split_heads(h)  # (B, heads, T, d/heads)
        p = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, heads, T, d/heads)
        return self.finish(h, att)

    def step(self, h: Tensor, cache_k: Tensor, cache_v: Tensor, t: int) -> Tensor:
        """One token ``h`` (B, 1, d) at position t: store its key/value, attend to positions 0..t."""
        q, k, v = self.split_heads(h)  # (B, heads, 1, d/heads)
        cache_k[:, :, t] = k[:, :, 0]
        cache_v[:, :, t] = v[:, :, 0]
        att = F.scaled_dot_product_attention(q, cache_k[:, :, : t + 1], cache_v[:, :, : t + 1])
        return self.finish(h, att)  # (B, 1, d)


class PixelTransformer(ARModel):
    name = "transformer"
    Config = TransformerConfig

    def __init__(self, image_shape: Sequence[int], config: TransformerConfig, levels: int = 2) -> None:
        super().__init__(image_shape, levels)
        self.config = config
        d = config.d_model
        self.value = nn.Linear(1, d)  # previous pixel's scaled level -> token
        self.start = nn.Parameter(torch.randn(d) * 0.02)  # stands in for "pixel -1"
        self.pos = nn.Parameter(torch.randn(self.num_dims, d) * 0.02)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(d, config.heads, config.dropout) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1 if levels == 2 else levels)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        v = self.value(self.scale_input(x).reshape(b, -1, 1))  # (B, D, d)
        h = self.drop(shift_right(v, self.start) + self.pos)  # (B, D, d)
        for block in self.blocks:
            h = block(h)  # (B, D, d)
        return self.sequence_logits(self.head(self.ln_f(h)))

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        *,
        given: Tensor | None = None,
        mask: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        """Ancestral sampling with a key/value cache (as in eval mode: no dropout); ``given``/``mask``:
        keep those pixels, as in ``ARModel.sample``."""
        cfg, dev, dtype = self.config, self.pos.device, self.pos.dtype
        shape = (n, cfg.heads, self.num_dims, cfg.d_model // cfg.heads)  # per layer, keys and values
        blocks = cast("list[Block]", list(self.blocks))
        caches = [torch.zeros(2, *shape, device=dev, dtype=dtype) for _ in blocks]
        self.sample_labels(n, y, torch.device("cpu"))  # unconditional: labels are an error
        flat, known = self.sample_start(n, given, mask, dev, dtype)  # (n, D), (n, D) bool or None
        for t in range(self.num_dims):
            token = self.start if t == 0 else self.value(self.scale_input(flat[:, t - 1, None]))  # (n, d)
            h = (token + self.pos[t]).expand(n, -1)[:, None]  # (n, 1, d)
            for block, cache in zip(blocks, caches, strict=True):
                h = block.step(h, cache[0], cache[1], t)  # (n, 1, d)
            logits = self.head(self.ln_f(h[:, 0]))  # (n, 1 or levels)
            draw = self.sample_step(logits[:, 0] if self.levels == 2 else logits, generator)  # (n,)
            self.place(flat, t, draw, known)
        return flat.view(n, *self.image_shape)  # (n, C, H, W)
