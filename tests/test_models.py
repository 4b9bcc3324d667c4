"""Correctness of every registered model: causality by gradients, normalisation, sampling, the likelihood
contract and checkpoints.

The suites are parametrised from ``ardetect.models.REGISTRY`` x each architecture's ``supported_levels``
(``toys.MODEL_CASES``) with the tiny configs of ``toys.TINY``: a newly registered model is checked here
without editing this file, and ``test_every_registered_arch_has_a_tiny_config`` fails until it has one.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from toys import MODEL_CASES, MODEL_IDS, TINY, all_images, dependence, model_cases, randomize, tiny_model

from ardetect.models import REGISTRY, ARModel, build_model, load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")

CASES_2 = [(n, lv) for n, lv in MODEL_CASES if lv == 2]
CASES_256 = [(n, lv) for n, lv in MODEL_CASES if lv == 256]


def _ids(cases: list[tuple[str, int]]) -> list[str]:
    return [f"{n}-{lv}" for n, lv in cases]


def test_every_registered_arch_has_a_tiny_config() -> None:
    """The suites below build each registered arch from toys.TINY; one missing would run at its
    (large, slow) defaults with no statement of what its causality test may demand."""
    missing = sorted(set(REGISTRY) - set(TINY))
    stale = sorted(set(TINY) - set(REGISTRY))
    assert not missing, f"add a tiny config for {missing} to tests/toys.py TINY"
    assert not stale, f"tests/toys.py TINY names unregistered architectures {stale}"


def test_cases_follow_the_registry() -> None:
    """A model registered later (e.g. by a plugin) joins the cases with each of its level counts."""

    class Toy(ARModel):
        name = "toy_arch"
        supported_levels = (2, 16)

    REGISTRY[Toy.name] = Toy
    try:
        assert [c for c in model_cases() if c[0] == "toy_arch"] == [("toy_arch", 2), ("toy_arch", 16)]
    finally:
        del REGISTRY["toy_arch"]
    assert {n for n, _ in MODEL_CASES} == set(REGISTRY)


def _shapes(name: str) -> list[tuple[int, int, int]]:
    shapes = [(1, 3, 3), (1, 4, 5), (2, 2, 3)]
    return [s for s in shapes if s[0] == 1 or not REGISTRY[name].single_channel_only]


CAUSAL_CASES = [(n, lv, s) for n, lv in MODEL_CASES for s in _shapes(n)]


@pytest.mark.parametrize(
    ("name", "levels", "shape"),
    CAUSAL_CASES,
    ids=[f"{n}-{lv}-{'x'.join(map(str, s))}" for n, lv, s in CAUSAL_CASES],
)
def test_causal_by_gradients(name: str, levels: int, shape: tuple[int, int, int]) -> None:
    """In every ordering the model mixes over, the logits at step k depend on no input at or after step k
    (in that ordering), and on earlier inputs as its TINY entry says (all of them: no blind spot)."""
    model = tiny_model(name, shape, levels)
    sees = TINY[name].sees_earlier
    d = math.prod(shape)
    x = torch.randint(0, levels, (2, *shape)).float()
    for k in range(model.num_orderings):
        model.select_ordering(k)
        rank = {pos: step for step, pos in enumerate(model.order.tolist())}
        for pos in range(d):
            dep = dependence(model, x, pos)
            later = [q for q in range(d) if rank[q] >= rank[pos]]
            earlier = [q for q in range(d) if rank[q] < rank[pos]]
            assert not dep[later].any(), (
                f"{name}: logits at {pos} depend on inputs at/after it (ordering {k})"
            )
            if earlier and sees == "all":
                assert dep[earlier].all(), f"{name}: logits at {pos} ignore some earlier input"
            elif earlier and sees == "some":
                assert dep[earlier].any(), f"{name}: logits at {pos} ignore every earlier input"


@pytest.mark.parametrize(("name", "levels"), CASES_2, ids=_ids(CASES_2))
def test_binary_probabilities_sum_to_one(name: str, levels: int) -> None:
    """All 2^9 binary 3x3 images (and all 2^8 2x2x2 ones where the model takes channels): total 1."""
    shapes = [(1, 3, 3)] + ([] if REGISTRY[name].single_channel_only else [(2, 2, 2)])
    for shape in shapes:
        model = tiny_model(name, shape, levels)
        with torch.no_grad():
            total = model.log_prob(all_images(shape, levels)).double().exp().sum()
        assert total.item() == pytest.approx(1.0, abs=1e-4), shape


@pytest.mark.parametrize(("name", "levels"), CASES_256, ids=_ids(CASES_256))
def test_256_level_second_pixel_conditionals_sum_to_the_first_pixels_probability(
    name: str, levels: int
) -> None:
    """For 16 values a of the first pixel of a 1x2 image, sum_b p(a, b) = p(a) from the first logits: the
    second conditional is normalised and neither pixel's conditional peeks at b (4,096 images; the
    exhaustive 65,536-image check is the slow test below)."""
    model = tiny_model(name, (1, 1, 2), levels)
    firsts = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(1)).float()
    x = torch.stack([firsts.repeat_interleave(256), torch.arange(256.0).repeat(16)], 1).view(-1, 1, 1, 2)
    with torch.no_grad():
        joint = model.log_prob(x).double().view(16, 256).logsumexp(1)  # (16,) log sum_b p(a, b)
        first = torch.log_softmax(model(x[::256]).double(), 1)[:, :, 0, 0, 0]  # (16, 256)
    marginal = first.gather(1, firsts.long()[:, None]).squeeze(1)  # (16,) log p(a)
    torch.testing.assert_close(joint, marginal, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "levels"), CASES_256, ids=_ids(CASES_256))
def test_256_level_probabilities_sum_to_one(name: str, levels: int) -> None:
    """All 256^2 8-bit 1x2 images: total probability 1."""
    model = tiny_model(name, (1, 1, 2), levels)
    with torch.no_grad():
        total = model.log_prob(all_images((1, 1, 2), levels)).double().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-4)


def _assert_frequencies_match(model: ARModel, n: int = 20_000) -> None:
    """Counts of every binary image among n samples against the model's exact probabilities (chi-square)."""
    shape = model.image_shape
    samples = model.sample(n, generator=torch.Generator().manual_seed(0)).flatten(1)  # (n, D)
    assert set(samples.unique().tolist()) <= {0.0, 1.0}, "binary samples must be 0/1"
    imgs = all_images(shape, 2).flatten(1)  # (2^D, D)
    with torch.no_grad():
        p = model.log_prob(imgs.view(-1, *shape)).double().exp()
    index = (samples.long() * (2 ** torch.arange(imgs.shape[1] - 1, -1, -1))).sum(1)  # lexicographic index
    counts = torch.bincount(index, minlength=len(imgs)).double()
    result = stats.chisquare(counts.numpy(), (p / p.sum() * n).numpy())
    assert result.pvalue > 1e-4, f"{model.name}: samples do not follow log_prob (p = {result.pvalue:.2g})"


def _assert_conditionals_match(model: ARModel, n: int = 2_000) -> None:
    """Randomised probability integral transform of every sampled pixel under its conditional (the logits
    of one causal forward pass over the samples) is Uniform(0, 1) exactly when the sampler draws each
    pixel from the model's conditional given the pixels drawn before it."""
    g = torch.Generator().manual_seed(0)
    samples = model.sample(n, generator=g)  # (n, C, H, W)
    assert torch.equal(samples, samples.round()) and samples.min() >= 0 and samples.max() < model.levels
    with torch.no_grad():
        probs = torch.softmax(model(samples).double(), 1)  # (n, L, C, H, W)
    below = probs.cumsum(1) - probs  # P(X < level) per level
    at = samples.long().unsqueeze(1)  # (n, 1, C, H, W)
    p_at, p_below = probs.gather(1, at).squeeze(1), below.gather(1, at).squeeze(1)  # (n, C, H, W)
    u = p_below + torch.rand(p_at.shape, generator=g, dtype=torch.float64) * p_at
    result = stats.kstest(u.flatten().numpy(), "uniform")
    assert result.pvalue > 1e-4, (
        f"{model.name}: samples do not follow the conditionals (p = {result.pvalue:.2g})"
    )


def _replay(model: ARModel, samples: torch.Tensor, seed: int) -> torch.Tensor:
    """Redraw every pixel, in the model's order, from the conditionals that one causal forward pass over
    ``samples`` gives, consuming a generator seeded as the sampler's was."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = model(samples)
    redrawn = torch.empty_like(samples).view(len(samples), -1)  # (n, D)
    for idx in model.order.tolist():
        redrawn[:, idx] = model.sample_step(model.position_logits(logits, idx), g)
    return redrawn.view_as(samples)


@pytest.mark.parametrize(("name", "levels"), MODEL_CASES, ids=MODEL_IDS)
def test_samples_follow_the_model(name: str, levels: int) -> None:
    """Binary: the frequencies of all 16 2x2 images match their exact probabilities (mixtures included).
    256 levels: every pixel of 1x2x3 samples follows its conditional. One ordering: the seeded draws are
    exactly those of the conditionals given the pixels drawn before (catches any dependence missed)."""
    shape = (1, 2, 2) if levels == 2 else (1, 2, 3)
    model = tiny_model(name, shape, levels)
    if levels == 2:
        _assert_frequencies_match(model)
    else:
        _assert_conditionals_match(model)
    if model.num_orderings == 1:
        samples = model.sample(500, generator=torch.Generator().manual_seed(7))
        assert torch.equal(_replay(model, samples, seed=7), samples), (
            f"{name}: draws ignore their conditionals"
        )


def _unconditioned(model: ARModel, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A broken sampler: every pixel drawn from its conditional given all-zero predecessors."""
    x = torch.zeros((n, *model.image_shape))
    with torch.no_grad():
        logits = model(x)
    out = torch.empty_like(x).view(n, -1)
    for idx in model.order.tolist():
        out[:, idx] = model.sample_step(model.position_logits(logits, idx), generator)
    return out.view_as(x)


SINGLE_ORDERING = [(n, lv) for n, lv in MODEL_CASES if n != "made"]


@pytest.mark.parametrize(("name", "levels"), SINGLE_ORDERING, ids=_ids(SINGLE_ORDERING))
def test_a_sampler_that_ignores_the_drawn_pixels_fails_the_replay(name: str, levels: int) -> None:
    model = tiny_model(name, (1, 2, 2) if levels == 2 else (1, 2, 3), levels)
    samples = _unconditioned(model, 500, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(_replay(model, samples, seed=7), samples)


def test_the_statistical_sampling_checks_can_fail() -> None:
    """Frequencies (binary, the MADE mixture too) and conditionals (256 levels) catch a sampler that
    ignores the pixels drawn before, on models whose conditionals depend strongly on them."""
    made = build_model("made", (1, 2, 2), hidden=[16], num_masks=1)
    randomize(made, gain=3.0)
    cases = [
        (made, _assert_frequencies_match),
        (tiny_model("transformer", (1, 2, 3), 256), _assert_conditionals_match),
    ]
    for model, check in cases:
        check(model)  # the real sampler passes
        model.sample = lambda n, generator=None, m=model: _unconditioned(m, n, generator)  # type: ignore[method-assign]
        with pytest.raises(AssertionError, match="do not follow"):
            check(model)


@pytest.mark.parametrize(("name", "levels"), MODEL_CASES, ids=MODEL_IDS)
def test_log_prob_is_the_likelihood_of_the_logits(name: str, levels: int) -> None:
    """Bernoulli or categorical likelihood of ``forward``'s logits, by hand; mixtures over orderings are
    the log-mean-exp of their components; bpd is log_prob in bits per dimension."""
    model = tiny_model(name, (1, 4, 4), levels)
    x = torch.randint(0, levels, (5, 1, 4, 4)).float()
    with torch.no_grad():
        per_ordering = []
        for k in range(model.num_orderings):
            model.select_ordering(k)
            logits = model(x)
            if levels == 2:
                by_hand = x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)
            else:
                by_hand = torch.log_softmax(logits, 1).gather(1, x.long().unsqueeze(1)).squeeze(1)
            per_ordering.append(by_hand.flatten(1).sum(1))
        model.select_ordering(0)
        expected = torch.logsumexp(torch.stack(per_ordering), 0) - math.log(len(per_ordering))
        got, bpd = model.log_prob(x), model.bpd(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(bpd, -got / (16 * math.log(2)))


@pytest.mark.parametrize(("name", "levels"), MODEL_CASES, ids=MODEL_IDS)
def test_checkpoint_round_trip(name: str, levels: int, tmp_path: Any) -> None:
    model = tiny_model(name, (1, 3, 3), levels)
    save_model(model, tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt").eval()
    assert type(again) is type(model) and again.config == model.config  # type: ignore[attr-defined]
    x = torch.randint(0, levels, (6, 1, 3, 3)).float()
    with torch.no_grad():
        torch.testing.assert_close(again.log_prob(x), model.log_prob(x))


def test_made_mixture_is_logmeanexp_not_averaged_logits() -> None:
    model = build_model("made", (1, 3, 3), hidden=[12], num_masks=4, natural_ordering=False, seed=1)
    randomize(model, gain=2.0)
    x = all_images((1, 3, 3), 2)
    with torch.no_grad():
        logits = []
        for k in range(4):
            model.select_ordering(k)
            logits.append(model(x))
        avg = torch.stack(logits).mean(0)
        averaged_logits = -F.binary_cross_entropy_with_logits(avg, x, reduction="none").flatten(1).sum(1)
        mixture = model.log_prob(x)
    assert not torch.allclose(mixture, averaged_logits, atol=1e-3)
    assert mixture.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_unknown_hyperparameter_and_model_are_errors() -> None:
    with pytest.raises(Exception, match="hiden"):
        build_model("made", (1, 3, 3), hiden=[4])
    with pytest.raises(ValueError, match="unknown model 'pixelcnnn'"):
        build_model("pixelcnnn", (1, 3, 3))
    with pytest.raises(ValueError, match="supports levels"):
        build_model("nade", (1, 3, 3), levels=256)
    with pytest.raises(ValueError, match="built for images of shape"):
        build_model("fvsbn", (1, 3, 3)).log_prob(torch.zeros(2, 1, 4, 4))
