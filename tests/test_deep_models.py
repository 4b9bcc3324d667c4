"""Correctness of the deep models (rnn, pixelcnn, gated_pixelcnn, transformer).

Causality by gradients for binary and 256-level inputs, exact normalisation, PixelCNN's blind spot and
the gated stacks that remove it, cached samplers that reproduce the reference sampler draw for draw,
the likelihood contract, checkpoints, and a short training run.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_models import all_images, assert_samples_follow_the_model

from ardetect.models import ARModel, build_model, load_model, save_model
from ardetect.models.gated_pixelcnn import min_layers

# (registry name, hyperparameters small enough for exhaustive checks)
DEEP_CASES: list[tuple[str, dict[str, Any]]] = [
    ("rnn", {"hidden": 12, "layers": 2, "embed": 6}),
    ("pixelcnn", {"channels": 8, "blocks": 2, "head_channels": 8}),
    # 4 layers of 3x3 cover every earlier pixel of 3x3 and 4x5 images: min_layers(4, 5, 3, 3) == 4
    ("gated_pixelcnn", dict(channels=6, layers=4, kernel_size=3, input_kernel_size=3, head_channels=8)),
    ("transformer", {"d_model": 16, "heads": 2, "layers": 2}),
]
NAMES = [name for name, _ in DEEP_CASES]
NO_BLIND_SPOT = {"rnn", "gated_pixelcnn", "transformer"}  # these see every earlier pixel
SEQUENCE_MODELS = [case for case in DEEP_CASES if case[0] in ("rnn", "transformer")]  # any C, cached samplers


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model: torch.nn.Module, gain: float = 1.0) -> None:
    """Fresh random weights everywhere (biases and norms included), scaled by fan-in to stay sane."""
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn_like(p) * gain / math.sqrt(fan_in))


def _build(name: str, hp: dict[str, Any], shape: tuple[int, int, int], levels: int) -> ARModel:
    model = build_model(name, shape, levels=levels, **hp)
    _randomize(model)
    return model.eval()


def _dependence(model: ARModel, x: torch.Tensor, pos: int) -> torch.Tensor:
    """Which inputs (flat index) the logits at flat position ``pos`` have a nonzero gradient for."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    if model.levels == 2:
        out = logits.flatten(1)[:, pos]  # (B,)
    else:
        out = logits.flatten(2)[:, :, pos]  # (B, levels)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(pos))  # no lucky cancellation
    (grad,) = torch.autograd.grad((out * weight).sum(), x)
    return grad.abs().sum(0).flatten() > 0  # (D,)


def _random_levels(n: int, shape: tuple[int, ...], levels: int) -> torch.Tensor:
    return torch.randint(0, levels, (n, *shape)).float()


@pytest.mark.parametrize(("name", "hp"), DEEP_CASES, ids=NAMES)
@pytest.mark.parametrize("levels", [2, 256])
@pytest.mark.parametrize("shape", [(1, 3, 3), (1, 4, 5)])
def test_causal_by_gradients(name: str, hp: dict[str, Any], levels: int, shape: tuple[int, int, int]) -> None:
    """Logits at i depend on no input at or after i, and on some (no blind spot: every) earlier input."""
    model = _build(name, hp, shape, levels)
    if name == "gated_pixelcnn":
        assert model.covers_all_pixels  # type: ignore[attr-defined]
    x = _random_levels(2, shape, levels)
    d = math.prod(shape)
    rank = {pos: step for step, pos in enumerate(model.order.tolist())}
    for pos in range(d):
        dep = _dependence(model, x, pos)
        later = [q for q in range(d) if rank[q] >= rank[pos]]
        earlier = [q for q in range(d) if rank[q] < rank[pos]]
        assert not dep[later].any(), f"{name}: logits at {pos} depend on inputs at/after it"
        if earlier:
            assert dep[earlier].any(), f"{name}: logits at {pos} ignore every earlier input"
        if name in NO_BLIND_SPOT:
            assert dep[earlier].all(), f"{name}: logits at {pos} ignore some earlier input"


@pytest.mark.parametrize(("name", "hp"), SEQUENCE_MODELS, ids=[n for n, _ in SEQUENCE_MODELS])
def test_sequence_models_order_channels_too(name: str, hp: dict[str, Any]) -> None:
    """With C > 1 the raster order runs over the flat (C, H, W) index: still causal, no blind spot."""
    shape = (2, 2, 3)
    model = _build(name, hp, shape, 2)
    x = _random_levels(2, shape, 2)
    for pos in range(12):
        dep = _dependence(model, x, pos)
        assert not dep[pos:].any() and dep[:pos].all()


@pytest.mark.parametrize("name", ["pixelcnn", "gated_pixelcnn"])
def test_convolutional_models_refuse_colour(name: str) -> None:
    with pytest.raises(ValueError, match="single-channel"):
        build_model(name, (3, 8, 8))


@pytest.mark.parametrize(
    ("name", "hp"),
    [
        ("pixelcnn", {"kernel_size": 4}),
        ("gated_pixelcnn", {"kernel_size": 1}),
        ("transformer", {"d_model": 10, "heads": 4}),
        ("transformer", {"dropout": 1.0}),
        ("rnn", {"hidden": 0}),
    ],
)
def test_bad_hyperparameters_are_errors(name: str, hp: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(hp))):
        build_model(name, (1, 8, 8), **hp)


@pytest.mark.parametrize(("name", "hp"), DEEP_CASES, ids=NAMES)
def test_long_and_float_inputs_agree(name: str, hp: dict[str, Any]) -> None:
    model = _build(name, hp, (1, 3, 4), 256)
    x = torch.randint(0, 256, (3, 1, 3, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.float()))


@pytest.mark.parametrize(("name", "hp"), DEEP_CASES, ids=NAMES)
@pytest.mark.parametrize(("shape", "levels"), [((1, 3, 3), 2), ((1, 1, 2), 256)])
def test_probabilities_sum_to_one(
    name: str, hp: dict[str, Any], shape: tuple[int, int, int], levels: int
) -> None:
    """All 2^9 binary 3x3 images, or all 256^2 8-bit 1x2 images: total probability 1."""
    model = _build(name, hp, shape, levels)
    with torch.no_grad():
        total = model.log_prob(all_images(shape, levels)).double().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(("name", "hp"), SEQUENCE_MODELS, ids=[n for n, _ in SEQUENCE_MODELS])
def test_probabilities_sum_to_one_with_channels(name: str, hp: dict[str, Any]) -> None:
    model = _build(name, hp, (2, 2, 2), 2)
    with torch.no_grad():
        total = model.log_prob(all_images((2, 2, 2), 2)).double().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-4)


def _blind_spot_dependence(model: ARModel, pos: int) -> torch.Tensor:
    x = _random_levels(2, (1, 9, 9), 2)
    return _dependence(model, x, pos)


def test_pixelcnn_has_a_blind_spot() -> None:
    """Output (8, 4) of a 9x9 PixelCNN sees (5, 8), two rows further up, but never (7, 8)."""
    model = _build("pixelcnn", {"channels": 8, "blocks": 4, "head_channels": 8}, (1, 9, 9), 2)
    dep = _blind_spot_dependence(model, 8 * 9 + 4).view(9, 9)
    assert dep[5, 8], "the receptive field should reach (5, 8) with 4 mask-B blocks"
    assert not dep[7, 8], "(7, 8) precedes (8, 4) in raster order but lies in PixelCNN's blind spot"
    assert not dep[8, 4:].any() and dep[8, :4].any()


@pytest.mark.parametrize(("kernel_size", "input_kernel_size"), [(3, 3), (5, 3), (3, 7)])
def test_gated_pixelcnn_minimum_layers_see_every_earlier_pixel(
    kernel_size: int, input_kernel_size: int
) -> None:
    """With min_layers(9, 9, ...) layers every output sees every earlier pixel; with one fewer, not."""
    need = min_layers(9, 9, kernel_size, input_kernel_size)
    for layers, complete in [(need, True), (need - 1, False)]:
        if layers < 1:
            continue
        hp = {
            "channels": 6,
            "layers": layers,
            "kernel_size": kernel_size,
            "input_kernel_size": input_kernel_size,
            "head_channels": 8,
        }
        model = _build("gated_pixelcnn", hp, (1, 9, 9), 2)
        assert model.covers_all_pixels is complete  # type: ignore[attr-defined]
        missed = []
        for pos in range(81):
            dep = _blind_spot_dependence(model, pos)
            assert not dep[pos:].any(), f"gated_pixelcnn output {pos} sees itself or the future"
            if not dep[:pos].all():
                missed.append(pos)
        assert (not missed) is complete, f"layers={layers}: outputs missing earlier pixels: {missed}"


def test_min_layers_formula() -> None:
    assert min_layers(28, 28, 3, 7) == 25
    assert min_layers(28, 28, 5, 7) == 13
    assert min_layers(32, 32, 5, 7) == 15
    assert min_layers(1, 1, 3, 3) == 1
    assert min_layers(2, 3, 3, 3) == 2


def _recording_sample(model: ARModel, sampler: Any, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``sampler(n, generator)`` and record the logits of every ``sample_step`` call it makes."""
    calls: list[torch.Tensor] = []
    step = model.sample_step

    def recording_step(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        calls.append(logits.clone())
        return step(logits, generator)

    model.sample_step = recording_step  # type: ignore[method-assign]
    try:
        return sampler(7, generator=torch.Generator().manual_seed(seed)), calls
    finally:
        del model.sample_step


@pytest.mark.parametrize(("name", "hp"), SEQUENCE_MODELS, ids=[n for n, _ in SEQUENCE_MODELS])
@pytest.mark.parametrize("levels", [2, 256])
def test_cached_sampler_matches_reference(name: str, hp: dict[str, Any], levels: int) -> None:
    """The cached sampler makes the same sample_step calls, with the same logits, as one full forward
    pass per position (the base-class sampler), so it draws exactly the same images."""
    model = _build(name, hp, (2, 3, 4), levels)
    cached, cached_calls = _recording_sample(model, model.sample, seed=3)
    reference, reference_calls = _recording_sample(model, partial(ARModel.sample, model), seed=3)
    assert len(cached_calls) == len(reference_calls) == 24
    for got, want in zip(cached_calls, reference_calls, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached, reference)
    assert len(cached.unique()) > 1


@pytest.mark.parametrize(("name", "hp"), DEEP_CASES, ids=NAMES)
@pytest.mark.parametrize("levels", [2, 256])
def test_samples_are_levels(name: str, hp: dict[str, Any], levels: int) -> None:
    model = _build(name, hp, (1, 3, 4), levels)
    s = model.sample(6, generator=torch.Generator().manual_seed(0))
    assert s.shape == (6, 1, 3, 4)
    assert torch.equal(s, s.round()) and s.min() >= 0 and s.max() <= levels - 1
    assert len(s.unique()) > 1


@pytest.mark.parametrize(("name", "hp"), DEEP_CASES, ids=NAMES)
def test_sampling_follows_the_model(name: str, hp: dict[str, Any]) -> None:
    assert_samples_follow_the_model(_build(name, hp, (1, 1, 2), 2))


@pytest.mark.parametrize(("name", "hp"), DEEP_CASES, ids=NAMES)
@pytest.mark.parametrize("levels", [2, 256])
def test_log_prob_is_likelihood_of_logits(name: str, hp: dict[str, Any], levels: int) -> None:
    model = _build(name, hp, (1, 4, 4), levels)
    x = _random_levels(5, (1, 4, 4), levels)
    with torch.no_grad():
        logits = model(x)
        if levels == 2:
            assert logits.shape == x.shape
            by_hand = x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)
        else:
            assert logits.shape == (5, levels, *x.shape[1:])
            by_hand = torch.log_softmax(logits, 1).gather(1, x.long().unsqueeze(1)).squeeze(1)
        got = model.log_prob(x)
    assert got.shape == (5,)
    torch.testing.assert_close(got, by_hand.flatten(1).sum(1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("name", "hp"), DEEP_CASES, ids=NAMES)
@pytest.mark.parametrize("levels", [2, 256])
def test_checkpoint_round_trip(name: str, hp: dict[str, Any], levels: int, tmp_path: Any) -> None:
    model = _build(name, hp, (1, 3, 3), levels)
    save_model(model, tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt").eval()
    assert type(again) is type(model) and again.config == model.config  # type: ignore[attr-defined]
    x = _random_levels(6, (1, 3, 3), levels)
    with torch.no_grad():
        torch.testing.assert_close(again.log_prob(x), model.log_prob(x))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("levels", [2, 256])
def test_default_config_is_finite_at_init(name: str, levels: int) -> None:
    """Freshly built with its defaults on 28x28 images: finite log-likelihoods near the uniform model's."""
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), levels=levels).eval()
    x = _random_levels(2, (1, 28, 28), levels)
    with torch.no_grad():
        bpd = model.bpd(x)
    assert torch.isfinite(bpd).all()
    assert (bpd < 2 * math.log2(levels)).all()


@pytest.mark.parametrize(("name", "hp"), DEEP_CASES, ids=NAMES)
def test_training_lowers_nll(name: str, hp: dict[str, Any]) -> None:
    """30 Adam steps on eight fixed 8x8 stripe images cut the NLL by at least 10%."""
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), **hp)
    rows = torch.arange(8)
    stripes = [(rows % p == 0).float() for p in (2, 3, 4, 5)]
    images = [s[:, None].expand(8, 8) for s in stripes] + [s[None, :].expand(8, 8) for s in stripes]
    data = torch.stack(images).unsqueeze(1)  # (8, 1, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = model.training_nll(data).item()
    for _ in range(30):
        opt.zero_grad()
        model.training_nll(data).backward()
        opt.step()
    with torch.no_grad():
        after = model.training_nll(data).item()
    assert after < 0.9 * before, f"{name}: NLL {before:.2f} -> {after:.2f}"
