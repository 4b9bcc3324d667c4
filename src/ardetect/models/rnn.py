"""LSTM over the pixels in raster order (a row-by-row PixelRNN without the 2-D structure).

The input sequence is shifted right by one step behind a learned start token, so the state that
predicts position i has read pixels 0..i-1 only. Each step's input is the previous pixel's scaled
level through a linear embedding plus a learned embedding of the position being predicted: without
it the LSTM would have to count to W to know where a row ends. Sampling carries the LSTM state, so it
costs D single steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import PositiveInt
from torch import Tensor, nn

from ardetect.configs import config_dataclass
from ardetect.models.base import ARModel, shift_right


@config_dataclass
class RNNConfig:
    hidden: PositiveInt = 256
    layers: PositiveInt = 2
    embed: PositiveInt = 32


class RasterLSTM(ARModel):
    name = "rnn"
    Config = RNNConfig

    def __init__(self, image_shape: Sequence[int], config: RNNConfig, levels: int = 2) -> None:
        super().__init__(image_shape, levels)
        self.config = config
        e = config.embed
        self.value = nn.Linear(1, e)  # previous pixel's scaled level -> input vector
        self.start = nn.Parameter(torch.randn(e) * 0.02)  # stands in for "pixel -1"
        self.pos = nn.Parameter(torch.randn(self.num_dims, e) * 0.02)  # where the next pixel lies
        self.lstm = nn.LSTM(e, config.hidden, config.layers, batch_first=True)
        with torch.no_grad():  # forget-gate bias 1 (Jozefowicz et al., 2015): the pixel above is W steps back
            for layer in range(config.layers):
                getattr(self.lstm, f"bias_ih_l{layer}")[config.hidden : 2 * config.hidden] = 1.0
                getattr(self.lstm, f"bias_hh_l{layer}")[config.hidden : 2 * config.hidden] = 0.0
        self.head = nn.Linear(config.hidden, 1 if levels == 2 else levels)

    def step_input(self, prev: Tensor | None, t: int, n: int) -> Tensor:
        """Input for predicting position t from the previous pixel's levels ``prev`` (n,): (n, 1, E)."""
        if prev is None:
            return (self.start + self.pos[t]).expand(n, 1, -1)
        return self.value(self.scale_input(prev)[:, None, None]) + self.pos[t]  # (n, 1, E)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        v = self.value(self.scale_input(x).reshape(b, -1, 1))  # (B, D, E)
        seq = shift_right(v, self.start) + self.pos  # (B, D, E)
        if seq.is_cuda and torch.is_grad_enabled() and not self.training:
            # cuDNN refuses the LSTM backward in eval mode; gradients of scores (attacks) need it.
            with torch.backends.cudnn.flags(enabled=False):
                out, _ = self.lstm(seq)  # (B, D, hidden)
        else:
            out, _ = self.lstm(seq)  # (B, D, hidden)
        return self.sequence_logits(self.head(out))

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
        """Ancestral sampling carrying the LSTM state: D single steps instead of D full passes
        (``given``/``mask``: keep those pixels, as in ``ARModel.sample``)."""
        self.sample_labels(n, y, torch.device("cpu"))  # unconditional: labels are an error
        flat, known = self.sample_start(n, given, mask, self.pos.device)  # (n, D), (n, D) bool or None
        state: tuple[Tensor, Tensor] | None = None
        prev: Tensor | None = None
        for t in range(self.num_dims):
            out, state = self.lstm(self.step_input(prev, t, n), state)  # (n, 1, hidden)
            logits = self.head(out[:, 0])  # (n, 1 or levels)
            draw = self.sample_step(logits[:, 0] if self.levels == 2 else logits, generator)  # (n,)
            self.place(flat, t, draw, known)
            prev = flat[:, t]
        return flat.view(n, *self.image_shape)  # (n, C, H, W)
