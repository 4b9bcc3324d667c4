"""What is particular to the deep models (rnn, pixelcnn, gated_pixelcnn, transformer).

PixelCNN's blind spot and the gated stacks that remove it, cached samplers that reproduce the reference
sampler draw for draw, default configs at 28x28, and a short training run. Causality, normalisation,
sampling, the likelihood contract and checkpoints of every registered model are in tests/test_models.py.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import pytest
import torch
from toys import TINY, dependence, random_levels, randomize, stripes, tiny_model

from ardetect.models import ARModel, build_model
from ardetect.models.gated_pixelcnn import min_layers

NAMES = ["rnn", "pixelcnn", "gated_pixelcnn", "transformer"]
SEQUENCE_MODELS = ["rnn", "transformer"]  # cached samplers


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("name", NAMES)
def test_long_and_float_inputs_agree(name: str) -> None:
    model = tiny_model(name, (1, 3, 4), 256)
    x = torch.randint(0, 256, (3, 1, 3, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.float()))


def _blind_spotdependence(model: ARModel, pos: int) -> torch.Tensor:
    x = random_levels(2, (1, 9, 9), 2)
    return dependence(model, x, pos)


def test_pixelcnn_has_a_blind_spot() -> None:
    """Output (8, 4) of a 9x9 PixelCNN sees (5, 8), two rows further up, but never (7, 8)."""
    model = build_model("pixelcnn", (1, 9, 9), channels=8, blocks=4, head_channels=8)
    randomize(model)
    dep = _blind_spotdependence(model, 8 * 9 + 4).view(9, 9)
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
        model = build_model("gated_pixelcnn", (1, 9, 9), **hp)
        randomize(model)
        assert model.covers_all_pixels is complete  # type: ignore[attr-defined]
        missed = []
        for pos in range(81):
            dep = _blind_spotdependence(model, pos)
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


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
@pytest.mark.parametrize("levels", [2, 256])
def test_cached_sampler_matches_reference(name: str, levels: int) -> None:
    """The cached sampler makes the same sample_step calls, with the same logits, as one full forward
    pass per position (the base-class sampler), so it draws exactly the same images."""
    model = tiny_model(name, (2, 3, 4), levels)
    cached, cached_calls = _recording_sample(model, model.sample, seed=3)
    reference, reference_calls = _recording_sample(model, partial(ARModel.sample, model), seed=3)
    assert len(cached_calls) == len(reference_calls) == 24
    for got, want in zip(cached_calls, reference_calls, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached, reference)
    assert len(cached.unique()) > 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("levels", [2, 256])
def test_default_config_is_finite_at_init(name: str, levels: int) -> None:
    """Freshly built with its defaults on 28x28 images: finite log-likelihoods near the uniform model's."""
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), levels=levels).eval()
    x = random_levels(2, (1, 28, 28), levels)
    with torch.no_grad():
        bpd = model.bpd(x)
    assert torch.isfinite(bpd).all()
    assert (bpd < 2 * math.log2(levels)).all()


@pytest.mark.parametrize("name", NAMES)
def test_training_lowers_nll(name: str) -> None:
    """30 Adam steps on eight fixed 8x8 stripe images cut the NLL by at least 10%."""
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), **TINY[name].hparams)
    data = stripes()  # (8, 1, 8, 8)
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
