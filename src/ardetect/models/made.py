"""MADE (Germain et al., 2015) with order-agnostic training over several masks.

With ``num_masks > 1`` training cycles through the masks (one per step) and the model's density is
the uniform mixture over masks, ``log p(x) = logmeanexp_k log p_k(x)``: each mask defines its own
normalised autoregressive model, so the mixture is normalised too (averaging logits would not be).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import NonNegativeInt, PositiveInt
from torch import Tensor, nn

from ardetect.configs import config_dataclass
from ardetect.models.base import ARModel, MaskedLinear


@config_dataclass
class MADEConfig:
    hidden: tuple[PositiveInt, ...] = (500,)
    num_masks: PositiveInt = 1
    natural_ordering: bool = True
    seed: NonNegativeInt = 0


def made_masks(
    num_inputs: int, hidden: Sequence[int], natural_ordering: bool, generator: torch.Generator
) -> tuple[Tensor, list[Tensor]]:
    """One ordering and the layer masks (out, in) that make the network respect it."""
    order = torch.arange(num_inputs) if natural_ordering else torch.randperm(num_inputs, generator=generator)
    degrees_in = torch.empty(num_inputs, dtype=torch.long)
    degrees_in[order] = torch.arange(num_inputs)  # degree = position in the ordering
    degrees = [degrees_in]
    for size in hidden:
        low = int(degrees[-1].min())
        high = max(num_inputs - 1, low + 1)
        degrees.append(torch.randint(low, high, (size,), generator=generator))
    masks = [(d_prev[None, :] <= d[:, None]).float() for d_prev, d in zip(degrees[:-1], degrees[1:])]
    masks.append((degrees[-1][None, :] < degrees_in[:, None]).float())  # strict: output i sees < i
    return order, masks


class MADE(ARModel):
    name = "made"
    supported_levels = (2,)
    Config = MADEConfig

    orders: Tensor

    def __init__(self, image_shape: Sequence[int], config: MADEConfig, levels: int = 2) -> None:
        super().__init__(image_shape, levels)
        self.config = config
        d = self.num_dims
        sizes = [d, *config.hidden, d]
        self.layers = nn.ModuleList(MaskedLinear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        gen = torch.Generator().manual_seed(config.seed)
        orders: list[Tensor] = []
        per_layer: list[list[Tensor]] = [[] for _ in self.layers]
        for _ in range(config.num_masks):
            order, masks = made_masks(d, config.hidden, config.natural_ordering, gen)
            orders.append(order)
            for store, mask in zip(per_layer, masks):
                store.append(mask)
        self.register_buffer("orders", torch.stack(orders))  # (K, D)
        for i, store in enumerate(per_layer):
            self.register_buffer(f"masks_{i}", torch.stack(store))  # (K, out, in)
        self.mask_index = 0
        self._train_steps = 0
        self.select_ordering(0)

    @property
    def num_orderings(self) -> int:
        return self.config.num_masks

    def select_ordering(self, k: int) -> None:
        self.mask_index = k
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, MaskedLinear)
            layer.set_mask(getattr(self, f"masks_{i}")[k])

    @property
    def order(self) -> Tensor:
        return self.orders[self.mask_index].cpu()

    def forward(self, x: Tensor) -> Tensor:
        h = self.scale_input(x).flatten(1)  # (B, D)
        for layer in self.layers[:-1]:
            h = torch.relu(layer(h))  # (B, hidden)
        return self.layers[-1](h).view(x.shape)  # (B, C, H, W)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Mixture over masks: logmeanexp of the per-mask exact log-likelihoods, shape (B,)."""
        self.check_input(x)
        self.sample_labels(x.shape[0], y, x.device)  # unconditional: labels are an error
        current = self.mask_index
        per_mask = []
        for k in range(self.num_orderings):
            self.select_ordering(k)
            per_mask.append(self.log_prob_from_logits(self(x), x))
        self.select_ordering(current)
        stacked = torch.stack(per_mask)  # (K, B)
        return torch.logsumexp(stacked, 0) - math.log(self.num_orderings)  # (B,)

    def training_nll(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Order-agnostic training: each step uses the next mask in turn."""
        self.check_input(x)
        self.sample_labels(x.shape[0], y, x.device)  # unconditional: labels are an error
        if self.num_orderings > 1:  # switch before the forward pass: backward needs this step's masks
            self.select_ordering(self._train_steps % self.num_orderings)
            self._train_steps += 1
        return -self.log_prob_from_logits(self(x), x).mean()

    def training_state(self) -> dict[str, Any]:
        """The step counter that picks each training step's mask, and the mask in use."""
        return {"train_steps": self._train_steps, "mask_index": self.mask_index}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self._train_steps = int(state["train_steps"])
        self.select_ordering(int(state["mask_index"]))

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
        """Sample the mixture: a uniformly drawn mask per image, then ancestral sampling in its order.

        ``given``/``mask`` keep those pixels as in ``ARModel.sample``; with several masks the mask is
        still drawn uniformly (not reweighted by the given pixels), so only ``num_masks == 1`` draws
        exactly from p(rest | given).
        """
        device = self.orders.device
        self.sample_labels(n, y, torch.device("cpu"))  # unconditional: labels are an error
        flat, known = self.sample_start(n, given, mask, device)  # validates before any draw
        current = self.mask_index
        comp = torch.randint(self.num_orderings, (n,), generator=generator, device=device)
        out = torch.zeros((n, *self.image_shape), device=device)  # (n, C, H, W)
        for k in range(self.num_orderings):
            idx = (comp == k).nonzero().flatten()
            if idx.numel():
                self.select_ordering(k)
                given_k = None if known is None else flat[idx].view(-1, *self.image_shape)
                mask_k = None if known is None else known[idx].view(-1, *self.image_shape)
                out[idx] = super().sample(idx.numel(), generator, given=given_k, mask=mask_k)
        self.select_ordering(current)
        return out
