"""The contract every autoregressive density model in ardetect follows.

A model sees an image as integer *levels* ``x`` in ``[0, levels)`` of shape ``(B, C, H, W)``
(binary images: ``levels == 2``; 8-bit images: ``levels == 256``) and factorises

    log p(x) = sum_i log p(x_{o(i)} | x_{o(<i)})

over an ordering ``o`` of the ``D = C*H*W`` positions (raster order unless the model says otherwise).
``forward`` returns the conditionals as logits:

* ``levels == 2``: Bernoulli logits with ``x``'s shape ``(B, C, H, W)``;
* ``levels > 2``: categorical logits of shape ``(B, levels, C, H, W)`` (the layout ``F.cross_entropy``
  expects), so subclasses never re-implement the likelihood.

``log_prob`` is then exact and shared; sampling in the model's order is shared too, and models with a
cheaper incremental path (RNN state, key/value caches) override ``sample``.

Class-conditional models (``config.num_classes = K > 0``; the PixelCNN family, van den Oord et al. 2016)
take labels ``y`` (B,) in ``forward(x, y)`` and model p(x | y). Their ``log_prob(x)`` is the exact
marginal log p(x) = log Σ_y p(y) p(x | y) with the uniform prior p(y) = 1/K (K passes), so they are
density models like the rest, and ``log_prob(x, y)`` is the conditional.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ImageShape = tuple[int, int, int]


class ARModel(nn.Module):
    """Base class: subclasses set ``name`` and implement ``forward`` (logits)."""

    name: ClassVar[str] = "base"
    #: level counts the architecture supports; dense binary models restrict this to ``(2,)``.
    supported_levels: ClassVar[tuple[int, ...]] = (2, 256)
    #: convolutional models whose masks order pixels but not colour channels set this.
    single_channel_only: ClassVar[bool] = False

    def __init__(self, image_shape: Sequence[int], levels: int = 2) -> None:
        super().__init__()
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
        if levels not in self.supported_levels:
            raise ValueError(
                f"model {self.name!r} supports levels {self.supported_levels}, got levels={levels}"
            )
        if self.single_channel_only and shape[0] != 1:
            raise ValueError(
                f"{self.name} supports single-channel images only (it orders pixels, not colour "
                f"channels), got image_shape={shape}"
            )
        self.image_shape: ImageShape = (shape[0], shape[1], shape[2])
        self.levels = int(levels)

    @property
    def num_classes(self) -> int:
        """K for a class-conditional model p(x | y) (``config.num_classes``), 0 for p(x)."""
        return int(getattr(getattr(self, "config", None), "num_classes", 0))

    def missing_labels(self) -> ValueError:
        return ValueError(
            f"{self.name} is class-conditional: pass labels y (B,) in 0..{self.num_classes - 1}, "
            "or use log_prob(x) for the marginal"
        )

    def logits_for(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``forward``'s logits, with the labels ``y`` (B,) for a class-conditional model."""
        if not self.num_classes:
            if y is not None:
                raise ValueError(f"{self.name} is not class-conditional (num_classes = 0); pass no labels")
            return self(x)  # type: ignore[no-any-return]
        if y is None:
            raise self.missing_labels()
        y = torch.as_tensor(y, device=x.device).long()
        if y.shape != x.shape[:1] or (y.numel() and (y.min() < 0 or y.max() >= self.num_classes)):
            raise ValueError(
                f"labels must have shape ({x.shape[0]},) with values in 0..{self.num_classes - 1}, "
                f"got shape {tuple(y.shape)}"
            )
        return self(x, y)  # type: ignore[no-any-return]

    @property
    def num_dims(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    @property
    def order(self) -> Tensor:
        """Generation order: ``order[k]`` is the flat (C, H, W) index generated at step ``k``."""
        return torch.arange(self.num_dims)

    @property
    def num_orderings(self) -> int:
        """How many orderings the model mixes over (order-agnostic models override)."""
        return 1

    def select_ordering(self, k: int) -> None:
        """Make ordering ``k`` the one ``forward`` and ``order`` use (a no-op for one ordering)."""
        if not 0 <= k < self.num_orderings:
            raise IndexError(f"{self.name} has {self.num_orderings} ordering(s), asked for {k}")

    def scale_input(self, x: Tensor) -> Tensor:
        """Map integer levels to floats in [0, 1] (binary images stay {0, 1})."""
        return x.float() / (self.levels - 1)

    def check_input(self, x: Tensor) -> None:
        """Reject a batch whose shape or encoding the model was not built for (ValueError).

        Every likelihood from data (``log_prob``, ``bpd``, ``training_nll``) runs this exactly once;
        ``forward`` does not (gradient tests and attacks feed it continuous inputs on purpose). ``x``
        may have any real dtype (bool too) but must hold whole numbers in ``[0, levels)``: gray/255
        floats given to a 256-level model, or gray levels given to a binary one, would otherwise score
        as garbage. Cheap enough for the training loop: one or two reductions and one host sync.
        """
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{self.name} was built for images of shape {self.image_shape}, "
                f"got a batch of shape {tuple(x.shape)}"
            )
        if x.dtype == torch.bool or x.numel() == 0:
            return  # bool holds 0/1 only, valid levels for every model
        if x.is_complex():
            raise self._encoding_error(f"a {x.dtype} tensor")
        x = x.detach()
        lo_t, hi_t = torch.aminmax(x)  # NaN propagates to both
        if x.is_floating_point():
            frac_t = x.frac().abs().amax()  # 0 for whole numbers; NaN for NaN/inf
            lo, hi, frac = torch.stack([lo_t, hi_t, frac_t]).tolist()  # one host sync
        else:
            (lo, hi), frac = torch.stack([lo_t, hi_t]).tolist(), 0
        if math.isnan(lo) or math.isnan(hi):
            raise self._encoding_error("NaN values")
        if not 0 <= lo <= hi < self.levels:
            raise self._encoding_error(f"values in [{lo:g}, {hi:g}]")
        if frac != 0:  # finite values in range, some not whole
            raise self._encoding_error(f"non-integer floats in [{lo:g}, {hi:g}]", fractional=True)

    def _encoding_error(self, got: str, fractional: bool = False) -> ValueError:
        """The ValueError ``check_input`` raises: what the model expects, what it got, and the fix."""
        score = "score gray images with ardetect.scoring.score_bpd"
        if self.levels == 2:
            expected = "binary pixels 0/1"
            fix = f"binarize first (ardetect.data) or {score}"
        else:
            top = self.levels - 1
            expected = f"integer gray levels 0..{top} (uint8, or floats holding whole numbers)"
            if fractional:  # most likely gray/255 images
                fix = f"multiply gray/{top} images by {top} and round, or {score}"
            else:
                fix = f"clip or re-quantize them to 0..{top}, or {score}"
        return ValueError(f"{self.name} (levels={self.levels}) expects {expected}; got {got}: {fix}")

    def sequence_logits(self, out: Tensor) -> Tensor:
        """Per-position outputs (B, D, 1 or levels) in raster order, in the ``forward`` logits layout."""
        b = out.shape[0]
        if self.levels == 2:
            return out.reshape(b, *self.image_shape)  # (B, C, H, W)
        return out.transpose(1, 2).reshape(b, self.levels, *self.image_shape)  # (B, levels, C, H, W)

    def pixel_nll_from_logits(self, logits: Tensor, x: Tensor) -> Tensor:
        """-log p(x_i | x_<i) of every position in nats, (B, C, H, W), from the conditionals ``logits``."""
        if self.levels == 2:
            return F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none")
        if (last := logits.movedim(1, -1)).is_contiguous():  # levels-last storage: 1.4x faster
            flat = last.reshape(-1, self.levels).float()  # (B*C*H*W, levels): a view
            return F.cross_entropy(flat, x.reshape(-1).long(), reduction="none").view(x.shape)  # (B, C, H, W)
        return F.cross_entropy(logits.float(), x.long(), reduction="none")  # (B, C, H, W)

    def log_prob_from_logits(self, logits: Tensor, x: Tensor) -> Tensor:
        """Exact log-likelihood in nats, shape (B,), from the conditionals ``logits``."""
        return -self.pixel_nll_from_logits(logits, x).flatten(1).sum(1)  # (B,)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Natural-log likelihood of each image, shape (B,): log p(x), or log p(x | y) given labels ``y``
        (class-conditional models; without ``y`` they return the exact marginal)."""
        self.check_input(x)
        if self.num_classes and y is None:
            return torch.logsumexp(self.class_log_probs(x), dim=1) - math.log(self.num_classes)  # (B,)
        return self.log_prob_from_logits(self.logits_for(x, y), x)

    def class_log_probs(self, x: Tensor) -> Tensor:
        """log p(x | y = k) for every class k, shape (B, K): one pass over the batch per class."""
        return -self.class_pixel_nll(x).sum(2)  # (B, K)

    def class_pixel_nll(self, x: Tensor) -> Tensor:
        """-log p(x_i | x_<i, y = k) of every position and class k in nats, shape (B, K, D): one pass
        over the batch per class (``class_log_probs`` sums it over D)."""
        self.check_input(x)
        if not self.num_classes:
            raise ValueError(f"{self.name} is not class-conditional (num_classes = 0)")
        per_class = [
            self.pixel_nll_from_logits(self(x, torch.full((x.shape[0],), k, device=x.device)), x).flatten(1)
            for k in range(self.num_classes)
        ]  # K × (B, D)
        return torch.stack(per_class, dim=1)  # (B, K, D)

    def training_nll(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Mean NLL (nats per image) that training minimises: -log p(x | y) for class-conditional models
        given labels (maximum likelihood on (x, y) pairs); mixtures override this."""
        return -self.log_prob(x, y).mean()

    def bpd(self, x: Tensor) -> Tensor:
        """Bits per dimension: -log p(x) / (C*H*W*ln 2), shape (B,)."""
        return -self.log_prob(x) / (self.num_dims * math.log(2.0))

    def sample_step(self, logits: Tensor, generator: torch.Generator | None) -> Tensor:
        """Draw levels from the conditionals at the positions given in ``logits`` (..., [levels])."""
        if self.levels == 2:
            probs = torch.sigmoid(logits.float())
            u = torch.rand(probs.shape, generator=generator, device=probs.device)
            return (u < probs).float()
        flat = logits.float().reshape(-1, self.levels)
        probs = torch.softmax(flat, dim=-1)
        draws = torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])
        return draws.float()

    def position_logits(self, logits: Tensor, flat_index: int) -> Tensor:
        """Logits of one flat position for the whole batch: (B,) or (B, levels)."""
        b = logits.shape[0]
        if self.levels == 2:
            return logits.reshape(b, -1)[:, flat_index]
        return logits.reshape(b, self.levels, -1)[:, :, flat_index]

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
        """Ancestral sampling in the model's order, one full forward pass per drawn position.

        Class-conditional models draw from p(x | y) for the labels ``y`` (n,) (default: ``arange(n) % K``,
        so a grid of 8 or 16 shows every class in turn).

        With ``given`` (levels, (n, C, H, W)) and ``mask`` (bool, True where a pixel is given; broadcast
        to ``given``'s shape), given pixels are kept and the others drawn in order, each conditioned on
        every pixel before it: exact draws from p(rest | given) when the given pixels come first in the
        order (e.g. the top rows in raster order, for inpainting the rest). Without them the draws are
        the unconditional ones, unchanged for a fixed ``generator``.
        """
        device = next(self.parameters()).device
        flat, known = self.sample_start(n, given, mask, device)  # (n, D), (n, D) bool or None
        x = flat.view(n, *self.image_shape)  # (n, C, H, W), shares storage with flat
        done = known.all(0).tolist() if known is not None else [False] * self.num_dims  # given everywhere
        y = self.sample_labels(n, y, device)
        for idx in self.order.tolist():
            if not done[idx]:
                logits = self.position_logits(self.logits_for(x, y), idx)
                self.place(flat, idx, self.sample_step(logits, generator), known)
        return x

    def sample_labels(self, n: int, y: Tensor | None, device: torch.device) -> Tensor | None:
        """The labels a class-conditional model uses for ``n`` images (``arange(n) % K`` by default); None,
        and an error if labels were passed, for an unconditional model."""
        if not self.num_classes:
            if y is not None:
                raise ValueError(f"{self.name} is not class-conditional; sample without labels")
            return None
        return torch.arange(n, device=device) % self.num_classes if y is None else y.to(device).long()

    def sample_start(
        self,
        n: int,
        given: Tensor | None,
        mask: Tensor | None,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor | None]:
        """The (n, D) canvas ``sample`` fills in (given pixels in place, zeros elsewhere) and the (n, D)
        bool mask of given pixels (None without ``given``); bad conditioning fails here, before any pass."""
        if given is None and mask is None:
            return torch.zeros(n, self.num_dims, device=device, dtype=dtype), None
        if given is None or mask is None:
            raise ValueError("sample: pass given and mask together (mask is True where given is kept)")
        shape = (n, *self.image_shape)
        if tuple(given.shape) != shape:
            raise ValueError(
                f"sample: given must hold the n={n} images to complete, shape {shape}; "
                f"got {tuple(given.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"sample: mask must be a bool tensor (True where given), got {mask.dtype}")
        try:
            known = mask.to(device).expand(shape)  # (n, C, H, W)
        except RuntimeError:
            raise ValueError(
                f"sample: mask of shape {tuple(mask.shape)} does not broadcast to given's shape {shape}"
            ) from None
        kept = torch.where(known, given.to(device), torch.zeros((), dtype=given.dtype, device=device))
        self.check_input(kept)  # given pixels must be valid levels; the others are ignored
        return kept.to(dtype).reshape(n, -1).clone(), known.reshape(n, -1)  # (n, D), (n, D)

    @staticmethod
    def place(flat: Tensor, idx: int, draw: Tensor, known: Tensor | None) -> None:
        """Write the draws (n,) of position ``idx`` into the canvas ``flat`` (n, D), keeping given pixels."""
        flat[:, idx] = draw if known is None else torch.where(known[:, idx], flat[:, idx], draw)

    def training_state(self) -> dict[str, Any]:
        """Training state kept outside ``state_dict`` (e.g. a Python step counter), for resuming a run.

        Plain ints, floats, strings, lists and dicts only: resume checkpoints load with
        ``torch.load(weights_only=True)``. Empty by default.
        """
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what ``training_state`` returned (called after ``load_state_dict``)."""


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 mask buffer inside ``F.linear``."""

    mask: Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("mask", torch.ones(out_features, in_features))

    def set_mask(self, mask: Tensor) -> None:
        self.mask.copy_(mask.to(self.mask.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.mask * self.weight, self.bias)


def per_class(table: Tensor, y: Tensor) -> Tensor:
    """Row ``y`` of ``table`` (K, ...) for each label: (B, ...). A one-hot matmul, not indexing: the
    backward of an indexed lookup accumulates gradients in a thread-dependent order on the CPU, so
    training would not be bit-for-bit reproducible."""
    onehot = F.one_hot(y, table.shape[0]).to(table.dtype)  # (B, K)
    return (onehot @ table.flatten(1)).view(len(y), *table.shape[1:])


class LabelBias(nn.Module):
    """A learned per-channel bias per class (conditional PixelCNN, van den Oord et al. 2016), (B, C)."""

    def __init__(self, num_classes: int, channels: int) -> None:
        super().__init__()
        # zero at initialisation: training starts from the unconditional model
        self.weight = nn.Parameter(torch.zeros(num_classes, channels))

    def forward(self, y: Tensor) -> Tensor:
        return per_class(self.weight, y)  # (B, C)


def label_bias(num_classes: int, channels: int) -> LabelBias | None:
    """The label's per-channel bias for a conditional model; None for an unconditional one."""
    return LabelBias(num_classes, channels) if num_classes else None


def shift_right(seq: Tensor, start: Tensor) -> Tensor:
    """``seq`` (B, D, E) one step later behind the start token ``start`` (E,): step i then carries
    positions 0..i-1 only, so sequence models predict pixel i without seeing it."""
    return torch.cat([start.expand(seq.shape[0], 1, -1), seq[:, :-1]], 1)  # (B, D, E)


class PixelLogitHead(nn.Sequential):
    """The conv models' output head: ReLU-1x1-ReLU-1x1 from features (B, ch, H, W) of a single-channel
    image to the ``forward`` logits layout, (B, 1, H, W) or (B, levels, 1, H, W).

    ``matmul_last`` runs the last 1x1 convolution as one matmul over all pixels that stores the logits
    levels-last, (B, H, W, levels), returned as a (B, levels, H, W) view: the likelihood's cross-entropy
    then runs over a contiguous last dimension (``ARModel.log_prob_from_logits``), on 2 cores 1.2x the
    training throughput of the conditional 8-bit PixelCNN against NCHW-contiguous logits. The layers keep
    ``nn.Sequential``'s indices, so checkpoints name ``head.1.*`` and ``head.3.*``.
    """

    def __init__(self, channels: int, hidden: int, levels: int, matmul_last: bool = False) -> None:
        out = 1 if levels == 2 else levels
        super().__init__(nn.ReLU(), nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, out, 1))
        self.levels, self.matmul_last = levels, matmul_last

    def forward(self, h: Tensor) -> Tensor:
        *hidden, last = self  # (slicing a Sequential would rebuild this class)
        for layer in hidden:
            h = layer(h)  # (B, hidden, H, W)
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        if self.matmul_last:
            b, _, rows, cols = h.shape
            pixels = h.permute(0, 2, 3, 1).reshape(b * rows * cols, -1)  # (B*H*W, hidden)
            out = torch.addmm(last.bias, pixels, last.weight.flatten(1).t())  # (B*H*W, out), levels-last
            out = out.view(b, rows, cols, -1).permute(0, 3, 1, 2)  # (B, 1 or levels, H, W): a view
        else:
            out = last(h)  # (B, 1 or levels, H, W)
        return out if self.levels == 2 else out.unsqueeze(2)  # (B, 1, H, W) or (B, levels, 1, H, W)
