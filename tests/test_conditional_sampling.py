"""Sampling conditioned on given pixels: ``model.sample(n, generator, given=..., mask=...)``.

Given pixels come first in raster order here, so the completions must follow the exact conditional
p(rest | given), which ``log_prob`` over every completion of a 2x2 binary image yields. The base sampler
(FVSBN, NADE, PixelCNN) and both cached overrides (RNN, transformer) are checked.
"""

from __future__ import annotations

import pytest
import torch
from toys import MODEL_CASES, MODEL_IDS, all_images, tiny_model

from ardetect.models import ARModel

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 2, 2)
CONDITIONED = ["fvsbn", "nade", "pixelcnn", "rnn", "transformer"]


def _copies(n: int, generator: torch.Generator) -> torch.Tensor:
    """2x2 binary images whose pixels copy the first one, each flipped with probability 0.15: every
    pixel depends strongly on those before it."""
    first = torch.rand(n, 1, generator=generator) < 0.5  # (n, 1)
    flips = torch.rand(n, 4, generator=generator) < 0.15  # (n, D)
    flips[:, 0] = False
    return (first ^ flips).float().view(n, *SHAPE)


def _fitted(name: str) -> ARModel:
    """A tiny model fitted to ``_copies`` by maximum likelihood: random weights barely condition (so a
    sampler that ignored ``given`` would pass), a fitted model must."""
    model = tiny_model(name, SHAPE).train()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        model.training_nll(_copies(256, g)).backward()
        opt.step()
    return model.eval()


def _exact_conditional(model: ARModel, prefix: tuple[float, ...]) -> torch.Tensor:
    """p(rest | first pixels = prefix) over the completions, in lexicographic order, from ``log_prob``."""
    imgs = all_images(SHAPE, 2).flatten(1)  # (16, D), lexicographic: the prefix pixels vary slowest
    match = (imgs[:, : len(prefix)] == torch.tensor(prefix)).all(1)  # (16,)
    with torch.no_grad():
        logp = model.log_prob(imgs[match].view(-1, *SHAPE)).double()  # (2^(D-k),)
    return torch.softmax(logp, 0)  # normalised over the completions


def _frequencies(rest: torch.Tensor) -> torch.Tensor:
    """Empirical frequencies of the completions ``rest`` (n, D-k) of 0/1, in lexicographic order."""
    k = rest.shape[1]
    index = (rest.long() * 2 ** torch.arange(k - 1, -1, -1)).sum(1)  # (n,)
    return torch.bincount(index, minlength=2**k).double() / len(rest)


@pytest.mark.parametrize("name", CONDITIONED)
def test_completions_follow_the_exact_conditional(name: str) -> None:
    """Half the images are given their first pixel (1), half their top row (0, 1): pixel 0 is given in
    every image, pixel 1 in half of them. Each half's completions match p(rest | given) within 5 standard
    errors of a frequency (at most 0.5 / sqrt(n)), and the given pixels come back unchanged."""
    model = _fitted(name)
    groups = {(1.0,): slice(0, 20_000), (0.0, 1.0): slice(20_000, 40_000)}
    n, tol = 40_000, 5 * 0.5 / 20_000**0.5  # per group: 20,000 draws
    given = torch.zeros(n, *SHAPE)
    mask = torch.zeros(n, *SHAPE, dtype=torch.bool)
    for prefix, rows in groups.items():
        given.view(n, -1)[rows, : len(prefix)] = torch.tensor(prefix)
        mask.view(n, -1)[rows, : len(prefix)] = True
    samples = model.sample(n, torch.Generator().manual_seed(0), given=given, mask=mask)
    assert torch.equal(samples[mask], given[mask]), f"{name}: given pixels changed"
    unconditional = model.sample(n, torch.Generator().manual_seed(1)).view(n, -1)  # (n, D)
    for prefix, rows in groups.items():
        k = len(prefix)
        exact = _exact_conditional(model, prefix)
        empirical = _frequencies(samples.view(n, -1)[rows, k:])
        assert (empirical - exact).abs().max().item() < tol, (
            f"{name}: completions of {prefix} give {empirical.tolist()}, p(rest | given) is {exact.tolist()}"
        )
        # power: sampling without the condition would fail this check (the given pixels matter)
        ignored = _frequencies(unconditional[rows, k:])
        assert (ignored - exact).abs().max().item() > 2 * tol, f"{name}: {prefix} barely changes p(rest)"


@pytest.mark.parametrize(("name", "levels"), MODEL_CASES, ids=MODEL_IDS)
def test_given_pixels_are_kept_and_the_rest_ignored(name: str, levels: int) -> None:
    """Any per-image mask (not only a prefix), mixtures included: given pixels come back unchanged, the
    values of ``given`` outside the mask are never read (out-of-range values there pass), and the drawn
    pixels are valid levels."""
    model = tiny_model(name, SHAPE, levels)
    g = torch.Generator().manual_seed(3)
    n = 64
    mask = torch.rand(n, *SHAPE, generator=g) < 0.5  # (n, C, H, W)
    levels_given = torch.randint(0, levels, (n, *SHAPE), generator=g).float()
    given = torch.where(mask, levels_given, torch.tensor(-7.0))  # garbage where not given
    samples = model.sample(n, g, given=given, mask=mask)
    assert torch.equal(samples[mask], given[mask])
    drawn = samples[~mask]
    assert torch.equal(drawn, drawn.round()) and drawn.min() >= 0 and drawn.max() < levels


def _reference_sample(model: ARModel, n: int, generator: torch.Generator) -> torch.Tensor:
    """The unconditional sampler's contract, written out: positions in the model's order, each from one
    full forward pass over the pixels drawn so far, one uniform (binary) or one multinomial draw (levels)
    per image and position from ``generator``."""
    x = torch.zeros(n, *model.image_shape)
    flat = x.view(n, -1)  # (n, D)
    for idx in model.order.tolist():
        with torch.no_grad():
            logits = model(x)
        if model.levels == 2:
            p = torch.sigmoid(logits.reshape(n, -1)[:, idx])  # (n,)
            flat[:, idx] = (torch.rand(n, generator=generator) < p).float()
        else:
            probs = torch.softmax(logits.reshape(n, model.levels, -1)[:, :, idx], -1)  # (n, levels)
            flat[:, idx] = torch.multinomial(probs, 1, generator=generator)[:, 0].float()
    return x


SINGLE_ORDER = [(name, lv) for name, lv in MODEL_CASES if name != "made"]


@pytest.mark.parametrize(("name", "levels"), SINGLE_ORDER, ids=[f"{n}-{lv}" for n, lv in SINGLE_ORDER])
def test_without_given_the_draws_are_unchanged(name: str, levels: int) -> None:
    """No regression: without ``given`` (and with a mask that gives nothing) a seeded sampler draws
    exactly what the plain ancestral sampler draws from the same seed."""
    model = tiny_model(name, SHAPE, levels)
    n = 32
    plain = model.sample(n, torch.Generator().manual_seed(5))
    assert torch.equal(plain, _reference_sample(model, n, torch.Generator().manual_seed(5)))
    nothing = torch.zeros(n, *SHAPE, dtype=torch.bool)
    given = torch.zeros(n, *SHAPE)
    assert torch.equal(plain, model.sample(n, torch.Generator().manual_seed(5), given=given, mask=nothing))


def test_bad_conditioning_names_the_problem() -> None:
    model = tiny_model("fvsbn", SHAPE)
    given, mask = torch.zeros(4, *SHAPE), torch.ones(4, *SHAPE, dtype=torch.bool)
    with pytest.raises(ValueError, match="pass given and mask together"):
        model.sample(4, given=given)
    with pytest.raises(ValueError, match=r"given must hold the n=3 images to complete, shape \(3, 1, 2, 2\)"):
        model.sample(3, given=given, mask=mask)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        model.sample(4, given=given, mask=mask.float())
    with pytest.raises(ValueError, match=r"mask of shape \(3, 2\) does not broadcast"):
        model.sample(4, given=given, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="binary pixels 0/1"):
        model.sample(4, given=given + 2, mask=mask)
