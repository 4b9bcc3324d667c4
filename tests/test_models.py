"""Correctness of every registered model: causality by gradients, normalisation, the likelihood contract.

Every test is parametrised over ``MODEL_CASES``, so a model added to the registry is checked here
by adding one line.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ardetect.models import REGISTRY, build_model, load_model, save_model

# (registry name, hyperparameters small enough for exhaustive checks)
MODEL_CASES: list[tuple[str, dict[str, Any]]] = [
    ("fvsbn", {}),
    ("nade", {"hidden": 7}),
    ("made", {"hidden": [16, 16], "num_masks": 1}),
    ("made", {"hidden": [16], "num_masks": 3, "natural_ordering": False, "seed": 4}),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(MODEL_CASES)]


def _randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere (some models zero-initialise), so every connection is live."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def all_images(shape: tuple[int, int, int], levels: int) -> torch.Tensor:
    d = math.prod(shape)
    grid = torch.tensor(list(itertools.product(range(levels), repeat=d)), dtype=torch.float32)
    return grid.view(-1, *shape)


def test_registry_has_foundation_models() -> None:
    assert {"fvsbn", "nade", "made"} <= set(REGISTRY)


@pytest.mark.parametrize(("name", "hp"), MODEL_CASES, ids=IDS)
@pytest.mark.parametrize("shape", [(1, 3, 3), (1, 4, 5), (2, 2, 3)])
def test_causal_by_gradients(name: str, hp: dict[str, Any], shape: tuple[int, int, int]) -> None:
    """Logit at step k depends on no input at or after step k, and on some input before it."""
    model = build_model(name, shape, **hp)
    _randomize(model)
    d = math.prod(shape)
    for k in range(model.num_orderings):
        model.select_ordering(k)
        order = model.order.tolist()
        rank = {pos: step for step, pos in enumerate(order)}
        x = torch.bernoulli(torch.full((2, *shape), 0.5)).requires_grad_(True)
        logits = model(x)
        assert logits.shape == x.shape
        for pos in range(d):
            grad = torch.autograd.grad(logits.flatten(1)[:, pos].sum(), x, retain_graph=True)[0]
            dep = grad.abs().sum(0).flatten() > 0
            later = [q for q in range(d) if rank[q] >= rank[pos]]
            assert not dep[later].any(), f"{name}: logit {pos} depends on inputs at/after it in order {order}"
            earlier = [q for q in range(d) if rank[q] < rank[pos]]
            if name != "made" and earlier:  # MADE's sparse masks may legitimately drop some inputs
                assert dep[earlier].any(), f"{name}: logit {pos} ignores every earlier input"


@pytest.mark.parametrize(("name", "hp"), MODEL_CASES, ids=IDS)
def test_made_like_models_see_the_past(name: str, hp: dict[str, Any]) -> None:
    """Across all positions, every model uses earlier inputs somewhere (not a constant model)."""
    shape = (1, 3, 3)
    model = build_model(name, shape, **hp)
    _randomize(model)
    x = torch.bernoulli(torch.full((4, *shape), 0.5)).requires_grad_(True)
    grad = torch.autograd.grad(model(x).sum(), x)[0]
    assert grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "hp"), MODEL_CASES, ids=IDS)
def test_probabilities_sum_to_one(name: str, hp: dict[str, Any]) -> None:
    model = build_model(name, (1, 3, 3), **hp)
    _randomize(model)
    with torch.no_grad():
        total = model.log_prob(all_images((1, 3, 3), 2)).exp().sum()  # 2^9 images
    assert total.item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(("name", "hp"), MODEL_CASES, ids=IDS)
def test_log_prob_is_bernoulli_likelihood_of_logits(name: str, hp: dict[str, Any]) -> None:
    model = build_model(name, (1, 4, 4), **hp)
    _randomize(model)
    x = torch.bernoulli(torch.full((5, 1, 4, 4), 0.3))
    with torch.no_grad():
        per_mask = []
        for k in range(model.num_orderings):
            model.select_ordering(k)
            logits = model(x)
            p = torch.sigmoid(logits)
            per_mask.append((x * torch.log(p) + (1 - x) * torch.log1p(-p)).flatten(1).sum(1))
        model.select_ordering(0)
        expected = torch.logsumexp(torch.stack(per_mask), 0) - math.log(len(per_mask))
        got = model.log_prob(x)
        bpd = model.bpd(x)
    assert got.shape == (5,)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(bpd, -got / (16 * math.log(2)))


def test_made_mixture_is_logmeanexp_not_averaged_logits() -> None:
    model = build_model("made", (1, 3, 3), hidden=[12], num_masks=4, natural_ordering=False, seed=1)
    _randomize(model)
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


@pytest.mark.parametrize(("name", "hp"), MODEL_CASES, ids=IDS)
def test_sample_is_binary_and_shaped(name: str, hp: dict[str, Any]) -> None:
    model = build_model(name, (1, 3, 4), **hp)
    _randomize(model)
    s = model.sample(6, generator=torch.Generator().manual_seed(0))
    assert s.shape == (6, 1, 3, 4)
    assert set(s.unique().tolist()) <= {0.0, 1.0}


def assert_samples_follow_the_model(model: torch.nn.Module) -> None:
    """Empirical frequencies of 20000 samples of 1x2 binary images match their exact probabilities."""
    s = model.sample(20000, generator=torch.Generator().manual_seed(0)).flatten(1)
    imgs = all_images((1, 1, 2), 2)
    with torch.no_grad():
        p = model.log_prob(imgs).exp()
    freq = torch.stack([(s == img.flatten()).all(1).float().mean() for img in imgs])
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)


def test_sampling_follows_the_model() -> None:
    model = build_model("fvsbn", (1, 1, 2))
    _randomize(model)
    assert_samples_follow_the_model(model)


@pytest.mark.parametrize(("name", "hp"), MODEL_CASES, ids=IDS)
def test_checkpoint_round_trip(name: str, hp: dict[str, Any], tmp_path: Any) -> None:
    model = build_model(name, (1, 3, 3), **hp)
    _randomize(model)
    save_model(model, tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    x = all_images((1, 3, 3), 2)
    with torch.no_grad():
        torch.testing.assert_close(again.log_prob(x), model.log_prob(x))


def test_unknown_hyperparameter_and_model_are_errors() -> None:
    with pytest.raises(Exception, match="hiden"):
        build_model("made", (1, 3, 3), hiden=[4])
    with pytest.raises(ValueError, match="unknown model 'pixelcnnn'"):
        build_model("pixelcnnn", (1, 3, 3))
    with pytest.raises(ValueError, match="supports levels"):
        build_model("nade", (1, 3, 3), levels=256)
    with pytest.raises(ValueError, match="built for images of shape"):
        build_model("fvsbn", (1, 3, 3)).log_prob(torch.zeros(2, 1, 4, 4))
