"""``log_prob``/``bpd``/``training_nll`` reject inputs in the wrong encoding, for every registered model.

A model sees integer levels in ``[0, levels)``; gray/255 floats given to an 8-bit model or gray levels
given to a binary one used to score silently as garbage. Cases come from the registry, so a model added
to it is checked here automatically (with its tiny config from ``tests/toys.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from toys import MODEL_CASES, MODEL_IDS, tiny_model

from ardetect.models import ARModel

SHAPE = (1, 4, 4)
D = math.prod(SHAPE)

CASES, IDS = MODEL_CASES, MODEL_IDS
CASES_256 = [case for case in CASES if case[1] == 256]
CASES_2 = [case for case in CASES if case[1] == 2]
ENTRY_POINTS: dict[str, Callable[[ARModel, torch.Tensor], torch.Tensor]] = {
    "log_prob": lambda model, x: model.log_prob(x),
    "bpd": lambda model, x: model.bpd(x),
    "training_nll": lambda model, x: model.training_nll(x),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str, levels: int) -> ARModel:
    """A tiny model with random weights everywhere (some models zero-initialise, which would make
    the likelihood ignore its input)."""
    return tiny_model(name, SHAPE, levels).train()


def _valid(levels: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Three images of whole levels that include both ends, 0 and levels - 1."""
    x = torch.randint(0, levels, (3, *SHAPE), generator=torch.Generator().manual_seed(1))
    x[0].view(-1)[0] = 0
    x[0].view(-1)[1] = levels - 1
    return x.to(dtype)


def _with_bad_pixel(levels: int, value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A valid batch with one bad value at the last pixel of the last image (the check must see all)."""
    x = _valid(levels, torch.float64)
    x[-1].view(-1)[-1] = value
    return x.to(dtype)


def _prefix(name: str, levels: int) -> str:
    return re.escape(f"{name} (levels={levels}) expects ")


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(("name", "levels"), CASES_256, ids=[f"{n}-{lv}" for n, lv in CASES_256])
def test_gray_over_255_rejected_by_256_level_models(name: str, levels: int, entry: str) -> None:
    model = _build(name, levels)
    gray = torch.arange(D, dtype=torch.float32).view(1, *SHAPE).repeat(2, 1, 1, 1) * 16  # 0..240
    message = (
        _prefix(name, levels)
        + re.escape("integer gray levels 0..255 (uint8, or floats holding whole numbers); ")
        + r"got non-integer floats in \[0, 0\.94\d*\]: "
        + re.escape("multiply gray/255 images by 255 and round, or score gray images with ")
        + re.escape("ardetect.scoring.score_bpd")
    )
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](model, gray / 255.0)
    ENTRY_POINTS[entry](model, gray)  # the same images as gray levels are fine


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("value", [0.5, 2.0])
@pytest.mark.parametrize(("name", "levels"), CASES_2, ids=[f"{n}-{lv}" for n, lv in CASES_2])
def test_non_binary_values_rejected_by_binary_models(
    name: str, levels: int, value: float, entry: str
) -> None:
    model = _build(name, levels)
    got = "non-integer floats in [0, 1]" if value == 0.5 else "values in [0, 2]"
    message = _prefix(name, 2) + re.escape(
        f"binary pixels 0/1; got {got}: binarize first (ardetect.data) or score gray images with "
        "ardetect.scoring.score_bpd"
    )
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](model, _with_bad_pixel(2, value))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
@pytest.mark.parametrize("value", [-1, 256, 2**40])
@pytest.mark.parametrize(("name", "levels"), CASES, ids=IDS)
def test_out_of_range_levels_rejected(name: str, levels: int, value: int, dtype: torch.dtype) -> None:
    model = _build(name, levels)
    x = _with_bad_pixel(levels, value, dtype)
    low, high = (value, levels - 1) if value < 0 else (0, value)
    got = re.escape(f"got values in [{low:g}, {high:g}]: ")
    with pytest.raises(ValueError, match=_prefix(name, levels) + ".*" + got):
        model.log_prob(x)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("name", "levels"), CASES, ids=IDS)
def test_nan_and_inf_rejected(name: str, levels: int, value: float) -> None:
    model = _build(name, levels)
    got = "NaN values" if math.isnan(value) else "values in"
    with pytest.raises(ValueError, match=_prefix(name, levels) + ".*got " + got):
        model.log_prob(_with_bad_pixel(levels, value))


@pytest.mark.parametrize(("name", "levels"), CASES, ids=IDS)
def test_whole_levels_accepted_in_any_dtype(name: str, levels: int) -> None:
    """uint8, int64 and float tensors of the same levels (bool for binary) give the same likelihood."""
    model = _build(name, levels).eval()
    x = _valid(levels)
    with torch.no_grad():
        reference = model.log_prob(x)
        assert reference.shape == (3,) and reference.isfinite().all()
        dtypes = [torch.int64, torch.float32, torch.float64] + ([torch.bool] if levels == 2 else [])
        for dtype in dtypes:
            torch.testing.assert_close(model.log_prob(x.to(dtype)), reference, msg=f"{name}: {dtype}")
        # and the likelihood still depends on the image: the check passes the data through unchanged
        assert not torch.equal(model.log_prob((levels - 1 - x.long()).to(torch.uint8)), reference)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(("name", "levels"), CASES, ids=IDS)
def test_every_likelihood_path_checks_exactly_once(
    name: str, levels: int, entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _build(name, levels)
    calls: list[torch.Tensor] = []
    original = model.check_input

    def spy(x: torch.Tensor) -> None:
        calls.append(x)
        original(x)

    monkeypatch.setattr(model, "check_input", spy)
    x = _valid(levels, torch.float32)
    ENTRY_POINTS[entry](model, x)
    assert len(calls) == 1, f"{name}.{entry} ran check_input {len(calls)} times"
    assert calls[0] is x


@pytest.mark.parametrize(("name", "levels"), CASES, ids=IDS)
def test_forward_takes_continuous_inputs(name: str, levels: int) -> None:
    """``forward`` stays unchecked: causality tests and attacks differentiate it at continuous inputs."""
    model = _build(name, levels)
    x = torch.rand(2, *SHAPE, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    assert grad.isfinite().all() and (grad != 0).any(), "the logits must respond to continuous inputs"


@pytest.mark.parametrize(("name", "levels"), CASES, ids=IDS)
def test_shape_errors_unchanged(name: str, levels: int) -> None:
    model = _build(name, levels)
    with pytest.raises(ValueError, match=re.escape(f"{name} was built for images of shape {SHAPE}")):
        model.log_prob(torch.zeros(2, 1, 4, 5))
