"""PixelDefend purification (Song et al., 2018) with an 8-bit autoregressive model, and BPDA against it.

Purification walks the pixels in raster order and sets each one to the most likely level under the
model's conditional given the already purified pixels, restricted to the window
``[x - ε_defend, x + ε_defend] ∩ [0, 255]`` around the input level (greedy decoding; ties go to the
lowest level, as ``torch.argmax`` breaks them). :func:`purify_reference` does exactly that: one full
forward pass per pixel.

:func:`purify` gets the same images with a few passes. Write ``F(y)_i`` for the windowed argmax at
pixel ``i`` of one forward pass on the image ``y``; it depends on ``y_<i`` only, so the greedy image
is the unique fixed point of ``F`` and Jacobi iteration ``y ← F(y)`` (from ``y = x``) reaches it.
Exactness does not rest on convergence heuristics: if ``k`` is the first pixel ``F(y)`` changes, the
prefix ``F(y)_≤k`` equals the greedy one (each of its pixels is the argmax given a prefix that did not
change), so every pass *certifies* at least one more pixel and the loop ends, at the latest after as
many passes as the reference, with ``F(y) = y``. Certified pixels are never rewritten, and a pass only
computes rows that can still change, on a crop that starts the model's receptive field above them
(:func:`receptive_field`; zero padding at a crop's top edge then never reaches those outputs). On the
trained 28x28 models (ε_defend 16 and 32) this takes 11-41 passes doing the work of 7-24 full passes
instead of 784: 16-105x less CPU time (benchmarks/bench_purify.py).

The logits of one pixel come from the same weights and inputs in both methods, but from tensors of
other shapes, so the float summation may differ in the last bits and could flip an exact tie between
two levels; tests/test_purify.py compares the levels without tolerance on random tiny models, and no
pixel has been seen to differ on the trained ones either.

Athalye et al. (2018)'s BPDA attacks the purifier: :class:`BPDAPurifier` purifies in its forward pass
and lets the gradient through unchanged, and Foolbox's L∞ PGD runs on it (:func:`bpda_pgd`).

Under ``torchrun`` (:func:`purify_sets`, :func:`bpda_pgd`) each rank takes one contiguous range of whole
batches of ``batch_size`` images and the results are gathered in rank order: a batch's decoding passes
depend on every image in it, so batches, not images, are shared out, each the very batch one process
decodes, and the purified images are one process's, bit for bit (with the same threads per process).
BPDA PGD's random starts come from one seeded stream across batches, which a rank first advances past
the batches before its own (``attacks.skip_random_draws``, checked by ``attacks.check_stream_handover``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import foolbox as fb
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from ardetect.attacks import Epsilon, check_stream_handover, rng_state, skip_random_draws
from ardetect.attacksets import AttackSet
from ardetect.classifier import predict, seeded
from ardetect.configs import Device, config_dataclass
from ardetect.distributed import Ranks
from ardetect.models.base import ARModel
from ardetect.models.gated_pixelcnn import GatedPixelCNN
from ardetect.models.pixelcnn import PixelCNN

if TYPE_CHECKING:  # types only: the purify stage's closure stays free of the training loop
    from ardetect.training import ModelEntry, TrainSection

LEVELS = 256
Level = Annotated[int, Field(ge=1, le=LEVELS - 1)]
CLEAN = "clean"
BPDA_ATTACK = "bpda_pgd"
#: PixelDefend's Fashion-MNIST result (Song et al., 2018, abstract): accuracy under the strongest attack.
PAPER_CLAIM = "accuracy under the strongest attack from 63% to 84%"
PAPER_MAX_EPSILON = 25  # its largest L∞ attack radius on Fashion-MNIST, in levels (ε_defend 32 against it)


@config_dataclass
class PurifyParams:
    """``purify`` in params.yaml; ``eps_defend`` in 8-bit levels (PixelDefend used 16 and 32 on
    Fashion-MNIST), ``bpda_epsilon`` the attack's L∞ radius in [0, 1] units."""

    model: str = "pixelcnn_8bit"  # an 8-bit model of train.models
    eps_defend: tuple[Level, ...] = (16, 32)
    num_images: PositiveInt = 32  # the first N attacked originals, and the first N of every attack set
    batch_size: PositiveInt = 128
    bpda_steps: PositiveInt = 10
    bpda_images: PositiveInt = 16  # the first N attacked originals
    bpda_epsilon: Epsilon = 8 / 255
    bpda_rel_stepsize: PositiveFloat = 0.25  # of bpda_epsilon per step
    seed: NonNegativeInt = 0
    device: Device = "auto"
    progress: bool = True

    @field_validator("eps_defend")
    @classmethod
    def _distinct(cls, eps: tuple[int, ...]) -> tuple[int, ...]:
        if not eps or len(set(eps)) != len(eps):
            raise ValueError(f"eps_defend must list distinct levels, at least one, got {list(eps)}")
        return eps


def purify_problems(
    purify: PurifyParams, train: TrainSection, models: dict[str, ModelEntry], attack_images: int
) -> list[str]:
    """Purification needs a trained 8-bit model, and attacked images for every image it evaluates."""
    problems = []
    if purify.model not in train.models or purify.model not in models:
        problems.append(
            f"purify.model = {purify.model!r}: not a trained model (train.models: {', '.join(train.models)})"
        )
    elif models[purify.model].levels != LEVELS:
        problems.append(f"purify.model = {purify.model!r}: purification needs an 8-bit model (levels: 256)")
    if purify.num_images > attack_images:
        problems.append(
            f"purify.num_images = {purify.num_images}: at most attack.num_images = {attack_images} "
            "(purification evaluates the attacked images)"
        )
    if purify.bpda_images > purify.num_images:
        problems.append(
            f"purify.bpda_images = {purify.bpda_images}: at most purify.num_images = {purify.num_images}"
        )
    return problems


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """How far above (rows) and left/right (columns) of a pixel the inputs behind its logits reach."""

    up: int
    left: int
    right: int


def receptive_field(model: ARModel) -> ReceptiveField:
    """The receptive field of a PixelCNN or gated PixelCNN from its config (upper bounds).

    * PixelCNN: a ``k0 x k0`` mask-A input convolution then ``blocks`` mask-B ``k x k`` convolutions
      (1x1 convolutions elsewhere): ``k0//2 + blocks * (k//2)`` rows up and columns either side (the
      blind spot makes the right reach smaller; an upper bound is all exactness needs).
    * Gated PixelCNN: ``R = p0 + (layers - 1) * p`` columns either side and ``R + 1`` rows up (the
      vertical stack reaches ``R`` rows above the row it feeds, shifted down by one).
    * any other raster-order model: the whole image.
    """
    _, height, width = model.image_shape
    if isinstance(model, PixelCNN):
        cfg = model.config
        reach = cfg.kernel_size // 2 + cfg.blocks * (cfg.block_kernel_size // 2)
        return ReceptiveField(up=reach, left=reach, right=reach)
    if isinstance(model, GatedPixelCNN):
        gcfg = model.config
        reach = gcfg.input_kernel_size // 2 + (gcfg.layers - 1) * (gcfg.kernel_size // 2)
        return ReceptiveField(up=reach + 1, left=reach, right=reach)
    return ReceptiveField(up=height, left=width, right=width)


def check_purifier(model: ARModel) -> None:
    """ValueError unless ``model`` is an 8-bit, single-channel model that generates in raster order."""
    if model.levels != LEVELS:
        raise ValueError(
            f"purification needs an 8-bit model (levels={LEVELS}), got {model.name} with "
            f"levels={model.levels}; pick one of train.models with levels: 256 (e.g. pixelcnn_8bit)"
        )
    if model.image_shape[0] != 1:
        raise ValueError(f"purification supports single-channel images, got image_shape={model.image_shape}")
    if not torch.equal(model.order, torch.arange(model.num_dims)):
        raise ValueError(f"{model.name} does not generate in raster order; greedy decoding assumes it does")


def window(x: Tensor, eps_defend: int) -> tuple[Tensor, Tensor]:
    """The levels a purified pixel may take: ``[x - ε, x + ε] ∩ [0, 255]`` as (lo, hi), each like ``x``."""
    if not 0 <= eps_defend <= LEVELS - 1:
        raise ValueError(f"eps_defend must be a whole number of levels in 0..255, got {eps_defend}")
    return (x - eps_defend).clamp(min=0), (x + eps_defend).clamp(max=LEVELS - 1)


def windowed_argmax(logits: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The most likely level in ``[lo, hi]`` of categorical ``logits`` (B, levels, ...): like ``lo``.

    Reads only the window's levels: indices ``lo, lo + 1, ..., hi`` (then ``hi`` repeated up to the widest
    window), so the first maximum, which ``argmax`` returns, is the lowest level among tied ones.
    """
    span = int((hi - lo).max()) + 1 if lo.numel() else 1
    shape = (1, span) + (1,) * (logits.dim() - 2)
    offsets = torch.arange(span, device=logits.device).view(shape)  # (1, span, 1, ...)
    index = torch.minimum(lo.long().unsqueeze(1) + offsets, hi.long().unsqueeze(1))  # (B, span, ...)
    best = logits.gather(1, index).argmax(1, keepdim=True)  # (B, 1, ...) position in the window
    return index.gather(1, best).squeeze(1).to(lo.dtype)  # (B, ...)


def _as_levels(model: ARModel, x: Tensor) -> Tensor:
    check_purifier(model)
    model.check_input(x)
    return x.float()


@torch.no_grad()
def purify_reference(model: ARModel, x: Tensor, eps_defend: int) -> Tensor:
    """Greedy PixelDefend decoding, one full forward pass per pixel: levels (B, 1, H, W) in, float out."""
    y = _as_levels(model, x).clone()  # (B, 1, H, W)
    lo, hi = (t.flatten(1) for t in window(y, eps_defend))  # (B, D) each
    flat = y.view(len(y), -1)  # (B, D), shares storage with y
    for i in range(flat.shape[1]):
        logits = model(y).flatten(2)[:, :, i]  # (B, levels)
        flat[:, i] = windowed_argmax(logits, lo[:, i], hi[:, i])
    return y


@dataclasses.dataclass
class DecodeStats:
    """Work done by :func:`purify`: images, forward passes, and pixels computed (rows x width x images)."""

    images: int = 0
    passes: int = 0
    pixels: int = 0


@torch.no_grad()
def purify(
    model: ARModel,
    x: Tensor,
    eps_defend: int,
    *,
    init: Tensor | None = None,
    stats: DecodeStats | None = None,
) -> Tensor:
    """The images :func:`purify_reference` returns, by certified Jacobi iteration (module docstring).

    ``init`` (levels, like ``x``) is the first guess, e.g. the previous purification of a nearby image
    (clamped into the window); it changes how many passes are needed, never the result.
    """
    x = _as_levels(model, x)  # (B, 1, H, W)
    b, _, height, width = x.shape
    num = height * width
    up = receptive_field(model).up
    lo, hi = window(x, eps_defend)  # (B, 1, H, W) each
    y = x.clone() if init is None else torch.minimum(torch.maximum(init.float(), lo), hi)
    certified = torch.zeros(b, dtype=torch.long, device=x.device)  # pixels known final, per image
    active = torch.arange(b, device=x.device)
    if stats is not None:
        stats.images += b
    while len(active):
        cert = certified[active]  # (A,)
        row = int(cert.min()) // width  # first row that can still change
        start = max(0, row - up)  # the crop that row's receptive field needs
        logits = model(y[active, :, start:])[:, :, :, row - start :]  # (A, levels, 1, H - row, W)
        new = windowed_argmax(logits, lo[active, :, row:], hi[active, :, row:]).flatten(1)  # (A, n)
        old = y[active, :, row:].flatten(1)  # (A, n)
        pos = torch.arange(row * width, num, device=x.device)  # (n,) flat index of each entry
        new = torch.where(pos < cert[:, None], old, new)  # certified pixels stay
        changed = new != old  # (A, n)
        first = torch.where(changed.any(1), changed.int().argmax(1) + row * width + 1, num)  # (A,)
        y[active, :, row:] = new.view(-1, 1, height - row, width)
        certified[active] = first  # the prefix up to the first change is final; all of it if none
        if stats is not None:
            stats.passes += 1
            stats.pixels += len(active) * (height - start) * width
        active = active[first < num]
    return y


def purify_images(
    model: ARModel,
    images: np.ndarray,
    eps_defend: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
    stats: DecodeStats | None = None,
) -> np.ndarray:
    """:func:`purify` over uint8 images (N, 1, H, W), batch by batch: uint8 (N, 1, H, W)."""
    if images.dtype != np.uint8:
        raise TypeError(f"purify_images expects uint8 gray levels, got {images.dtype}")
    model = model.to(device).eval()
    out = []
    batches = range(0, len(images), batch_size)
    for i in tqdm(batches, desc=f"purify ε={eps_defend}", leave=False, disable=not progress):
        x = torch.as_tensor(images[i : i + batch_size]).to(device)  # (B, 1, H, W) uint8
        out.append(purify(model, x, eps_defend, stats=stats).to(torch.uint8).cpu().numpy())
    return np.concatenate(out) if out else images.copy()


class BPDAPurifier(nn.Module):
    """``classifier(purify(x))`` for x in [0, 1], whose gradient is the classifier's at the purified
    image (BPDA: the purifier's backward pass is the identity).

    The forward pass rounds ``x`` to 8 bits and purifies it under ``no_grad``; the result enters the
    classifier as ``x + (purified - x).detach()``. Each call starts decoding from the previous call's
    purified batch (same shape): PGD moves the image a little per step, so few passes are needed.
    """

    def __init__(self, classifier: nn.Module, density: ARModel, eps_defend: int) -> None:
        super().__init__()
        check_purifier(density)
        self.classifier, self.density, self.eps_defend = classifier, density, eps_defend
        self.previous: Tensor | None = None
        self.stats = DecodeStats()

    def forward(self, x: Tensor) -> Tensor:
        levels = (x.detach() * (LEVELS - 1)).round().clamp(0, LEVELS - 1)  # (B, 1, H, W)
        init = self.previous if self.previous is not None and self.previous.shape == levels.shape else None
        purified = purify(self.density, levels, self.eps_defend, init=init, stats=self.stats)
        self.previous = purified
        x_purified = x + (purified / (LEVELS - 1) - x).detach()  # (B, 1, H, W): value purified, grad identity
        return self.classifier(x_purified)  # (B, K)


def bpda_pgd(
    classifier: nn.Module,
    density: ARModel,
    images: np.ndarray,
    labels: np.ndarray,
    eps_defend: int,
    params: PurifyParams,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Foolbox L∞ PGD (``params.bpda_*``) through purifier and classifier with BPDA; uint8 adversarials.

    Under ``torch.distributed`` every rank calls it with the same arguments, attacks its range of whole
    batches and gets every adversarial (module docstring). A rank's first batch starts decoding from
    scratch, where one process starts from the previous batch's purified images (when the shapes match):
    that changes how many passes the decoding takes, not the greedy images it certifies (:func:`purify`;
    but for the last-bit caveat of the module docstring, never seen), so not the attack either."""
    device = torch.device(device)
    wrapped = BPDAPurifier(classifier.to(device).eval(), density.to(device).eval(), eps_defend).eval()
    fmodel = fb.PyTorchModel(wrapped, bounds=(0.0, 1.0), device=device)
    attack = fb.attacks.LinfPGD(steps=params.bpda_steps, rel_stepsize=params.bpda_rel_stepsize)
    ranks = Ranks.current()
    mine = ranks.shard_range(len(images), params.batch_size)  # this rank's images, in whole batches
    advs = []
    with seeded(params.seed, device):
        skip_random_draws(1, mine.start, params.batch_size, images.shape[1:], device)  # one random start
        begin = rng_state(device)
        for i in range(mine.start, mine.stop, params.batch_size):
            x = torch.as_tensor(images[i : i + params.batch_size]).float().to(device) / 255.0  # (B, 1, H, W)
            y = torch.as_tensor(labels[i : i + params.batch_size]).long().to(device)  # (B,)
            _, clipped, _ = attack(fmodel, x, y, epsilons=params.bpda_epsilon)
            advs.append(clipped.detach().clamp(0, 1).cpu().numpy())
        end = rng_state(device)
    advs = ranks.gather_rows(advs)  # every rank's batches, in order: one process's
    check_stream_handover(ranks, begin, end, "BPDA PGD")
    return np.rint(np.concatenate(advs) * 255.0).astype(np.uint8)  # (N, 1, H, W), stored as 8-bit images


@dataclasses.dataclass(frozen=True)
class PurifiedSet:
    """One set of N images before and after purification at ``eps_defend``, with the classifier's
    predictions on both."""

    slug: str
    eps_defend: int
    images: np.ndarray  # (N, 1, H, W) uint8
    labels: np.ndarray
    purified: np.ndarray
    before: np.ndarray
    after: np.ndarray

    def summary(self) -> dict[str, float]:
        n = len(self.labels)
        return {
            "accuracy_before": float((self.before == self.labels).mean()) if n else math.nan,
            "accuracy_after": float((self.after == self.labels).mean()) if n else math.nan,
            "n": float(n),
        }


def purify_sets(
    classifier: nn.Module,
    density: ARModel,
    sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    eps_defend: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
    stats: DecodeStats | None = None,
) -> list[PurifiedSet]:
    """Purify every ``slug -> (uint8 images, labels)`` set (in one stream of batches) and classify both.

    Under ``torch.distributed`` every rank calls it with the same arguments, purifies its range of whole
    batches of the stream and gets every result; ``stats`` then counts the work of all ranks, and only
    rank 0 shows progress."""
    sizes = [len(images) for images, _ in sets.values()]
    everything = np.concatenate([images for images, _ in sets.values()])  # (sum N, 1, H, W)
    ranks, work = Ranks.current(), DecodeStats()  # work: this rank's decoding
    share = ranks.shard_range(len(everything), batch_size)  # this rank's images, in whole batches
    mine = everything[share.start : share.stop]
    part = purify_images(density, mine, eps_defend, batch_size, device, progress and ranks.lead, work)
    purified = np.split(ranks.gather_rows(part), np.cumsum(sizes)[:-1])  # one process's purified stream
    if stats is not None:
        for w in ranks.gather(work):
            stats.images += w.images
            stats.passes += w.passes
            stats.pixels += w.pixels
    return [
        PurifiedSet(
            slug, eps_defend, images, labels, after, predict(classifier, images), predict(classifier, after)
        )
        for (slug, (images, labels)), after in zip(sets.items(), purified)
    ]


def purify_figure(sets: Sequence[PurifiedSet], n: int = 8) -> Figure:
    """Two rows per set, the images and their purified versions; titles are predictions, red when wrong."""
    n = min([n, *(len(s.labels) for s in sets)])
    fig = Figure(figsize=(1.2 * n + 1.6, 1.35 * 2 * len(sets)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 * len(sets), n, squeeze=False)
    for k, s in enumerate(sets):
        rows = ((s.images, s.before, s.slug), (s.purified, s.after, f"purified ε={s.eps_defend}"))
        for r, (images, pred, name) in enumerate(rows):
            ax_row = axes[2 * k + r]
            for j in range(n):
                ax_row[j].imshow(images[j, 0], cmap="gray", vmin=0, vmax=255)
                wrong = pred[j] != s.labels[j]
                ax_row[j].set_title(str(pred[j]), fontsize=8, color="tab:red" if wrong else "black")
            ax_row[0].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def _percent(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.0%}"


def markdown_section(metrics: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]) -> str:
    """report.md's section: accuracy before and after purification per set and ε_defend, per model,
    with the strongest attack next to PixelDefend's Fashion-MNIST claim.

    ``metrics``: ``{model: {eps_defend: {set slug: {"accuracy_before", "accuracy_after", "n"}}}}``
    (data/metrics/purify.json). The BPDA set attacks the purifier at its own ε_defend, so it has a row
    per ε_defend; every other set is the same images at every ε_defend.
    """
    parts = [
        "## PixelDefend purification",
        "",
        "Classifier accuracy before and after greedy purification (each pixel set to its most likely "
        "level within ±ε_defend of the input, ε_defend in 8-bit levels), on the attacked clean "
        f"originals (`{CLEAN}`) and on each attack set; `{BPDA_ATTACK}_e<k>` is L∞ PGD through the "
        "purifier with BPDA (Athalye et al., 2018), crafted against each ε_defend. "
        f"PixelDefend (Song et al., 2018) reports on Fashion-MNIST {PAPER_CLAIM}.",
        "",
    ]
    for model, by_eps in metrics.items():
        eps_keys = list(by_eps)
        slugs = list(dict.fromkeys(s for sets in by_eps.values() for s in sets))
        oblivious = [s for s in slugs if not s.startswith(BPDA_ATTACK)]
        oblivious.sort(key=lambda s: (s != CLEAN, AttackSet.from_slug(s).sort_key))
        header = ["set", "n", "before", *(f"after ε={e}" for e in eps_keys)]
        rows = []
        for slug in oblivious:
            first = by_eps[eps_keys[0]][slug]
            after = [_percent(by_eps[e][slug]["accuracy_after"]) for e in eps_keys]
            rows.append([f"`{slug}`", str(int(first["n"])), _percent(first["accuracy_before"]), *after])
        for slug in (s for s in slugs if s not in oblivious):
            for e in (k for k in eps_keys if slug in by_eps[k]):
                m = by_eps[e][slug]
                after = [_percent(m["accuracy_after"]) if k == e else "—" for k in eps_keys]
                rows.append(
                    [f"`{slug}` (against ε={e})", str(int(m["n"])), _percent(m["accuracy_before"]), *after]
                )
        table = [header, ["---"] * len(header), *rows]
        parts += [f"### {model}", "", *("| " + " | ".join(r) + " |" for r in table), ""]
        parts += [
            "Strongest attack, " + _strongest(by_eps, eps_keys, math.inf),
            "",
            f"Within PixelDefend's Fashion-MNIST threat model (L∞ attacks, ε ≤ {PAPER_MAX_EPSILON}/255), "
            + _strongest(by_eps, eps_keys, PAPER_MAX_EPSILON / 255)
            + f" PixelDefend: {PAPER_CLAIM}.",
            "",
        ]
    return "\n".join(parts)


def _strongest(
    by_eps: Mapping[str, Mapping[str, Mapping[str, float]]], eps_keys: list[str], max_epsilon: float
) -> str:
    """The lowest accuracy before purification over attack sets with ε ≤ ``max_epsilon`` (unbounded
    attacks only when it is infinite), and the lowest after it per ε_defend (BPDA included)."""

    def within(slug: str) -> bool:
        eps = AttackSet.from_slug(slug).epsilon
        return is_attack(slug) and (math.inf if eps is None else eps) <= max_epsilon + 1e-9

    first = by_eps[eps_keys[0]]
    before = [s for s in first if within(s) and not s.startswith(BPDA_ATTACK)]
    if not before:
        return "no attack sets."
    strongest = min(before, key=lambda s: first[s]["accuracy_before"])
    afters = []
    for e in eps_keys:
        worst = min(filter(within, by_eps[e]), key=lambda s: by_eps[e][s]["accuracy_after"])
        afters.append(f"{_percent(by_eps[e][worst]['accuracy_after'])} at ε_defend={e} (`{worst}`)")
    return (
        f"before purification: `{strongest}`, accuracy {_percent(first[strongest]['accuracy_before'])}; "
        f"lowest accuracy after purification: {', '.join(afters)}."
    )


def is_attack(slug: str) -> bool:
    """Whether a set of purify.json is an attack (not the clean images nor a noise control)."""
    return slug != CLEAN and not AttackSet.from_slug(slug).is_control


def as_metrics(results: Sequence[PurifiedSet]) -> dict[str, dict[str, dict[str, float]]]:
    """``{eps_defend: {slug: summary}}`` for purify.json (eps as strings: JSON keys)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        out.setdefault(str(r.eps_defend), {})[r.slug] = r.summary()
    return out


def evaluation_sets(
    test_images: np.ndarray, test_labels: np.ndarray, files: Sequence[Path], num_images: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{slug: (uint8 images, labels)}``: the first ``num_images`` attacked originals as ``clean``, then
    the same rows of every attack-set file (``attacks.save_attack_set``'s format), without the images
    where the attack returned its failure sentinel (an all-zero image, not an attack)."""
    if not files:
        raise FileNotFoundError(
            "no attack sets in data/attacks or data/adaptive; run the attack stages first "
            "(`dvc repro attack adaptive`)"
        )
    index: np.ndarray | None = None
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in files:
        with np.load(path) as a:
            rows = a["source_index"][:num_images]
            if index is None or len(rows) > len(index):
                if index is not None and not np.array_equal(rows[: len(index)], index):
                    raise ValueError(f"{path} attacks other originals than the other sets (source_index)")
                index = rows
            elif not np.array_equal(rows, index[: len(rows)]):
                raise ValueError(f"{path} attacks other originals than the other sets (source_index)")
            keep = ~a["failed"][:num_images]
            slug = AttackSet.of(a["attack"], a["epsilon"]).slug
            sets[slug] = (a["adversarial"][:num_images][keep], a["label"][:num_images][keep])
    assert index is not None
    return {CLEAN: (test_images[index], test_labels[index]), **sets}


#: Sets drawn in the stage's example figures, with the BPDA set.
SHOWN = (CLEAN, "pgd_e8")


@dataclasses.dataclass
class PurifyRun:
    """Everything the purify stage measured: per (ε_defend, set) results and the decoding work."""

    results: list[PurifiedSet]
    stats: DecodeStats
    seconds: float
    bpda_slug: str

    def metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        return as_metrics(self.results)

    def headline(self) -> dict[str, float]:
        """Every number of :meth:`metrics` under one flat name ``eps<k>/<set>/<key>`` (MLflow metrics)."""
        return {f"eps{e}/{s}/{k}": v for e, sets in self.metrics().items()
                for s, m in sets.items() for k, v in m.items()}  # fmt: skip

    def save_figures(self, folder: Path) -> list[Path]:
        """``folder/examples_eps<k>.png``: the ``SHOWN`` sets and the BPDA set before and after."""
        paths = []
        for eps in dict.fromkeys(r.eps_defend for r in self.results):
            shown = [r for r in self.results if r.eps_defend == eps and r.slug in (*SHOWN, self.bpda_slug)]
            paths.append(folder / f"examples_eps{eps}.png")
            purify_figure(shown).savefig(paths[-1], dpi=120)
        return paths

    def summary(self) -> str:
        lines = [
            f"ε_defend={eps}: "
            + ", ".join(f"{s} {m['accuracy_before']:.0%}→{m['accuracy_after']:.0%}" for s, m in sets.items())
            for eps, sets in self.metrics().items()
        ]
        lines.append(
            f"purified {self.stats.images} images with {self.stats.passes} passes in {self.seconds:.1f} s"
        )
        return "\n".join(lines)


def run_purify(
    classifier: nn.Module,
    density: ARModel,
    sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    config: PurifyParams,
    device: torch.device | str = "cpu",
) -> PurifyRun:
    """Purify every set at each ``config.eps_defend``, and attack the purifier there with BPDA PGD on the
    first ``config.bpda_images`` clean originals (:func:`bpda_pgd`)."""
    stats, start = DecodeStats(), time.perf_counter()
    clean_images, labels = (a[: config.bpda_images] for a in sets[CLEAN])
    bpda_slug = AttackSet(BPDA_ATTACK, config.bpda_epsilon).slug
    results: list[PurifiedSet] = []
    for eps in config.eps_defend:
        results += purify_sets(
            classifier, density, sets, eps, config.batch_size, device, config.progress, stats
        )
        adversarial = bpda_pgd(classifier, density, clean_images, labels, eps, config, device)
        bpda = {bpda_slug: (adversarial, labels)}
        results += purify_sets(
            classifier, density, bpda, eps, config.batch_size, device, config.progress, stats
        )
    return PurifyRun(results, stats, time.perf_counter() - start, bpda_slug)
