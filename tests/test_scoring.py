"""BPD scoring: static vs dynamic binarization, the Monte-Carlo estimate against enumeration, errors."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ardetect.models import build_model
from ardetect.models.base import ARModel
from ardetect.scoring import ScoreConfig, score_bpd


def _random_fvsbn(shape: Sequence[int]) -> ARModel:
    model = build_model("fvsbn", shape)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


class Categorical256(ARModel):
    """An 8-bit model with one independent categorical per pixel (exact BPD by hand)."""

    name = "categorical256"

    def __init__(self, image_shape: Sequence[int]) -> None:
        super().__init__(image_shape, levels=256)
        self.logits = nn.Parameter(torch.randn(256, *self.image_shape))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], *self.logits.shape)  # (B, 256, C, H, W)


def test_binary_images_static_equals_dynamic() -> None:
    model = _random_fvsbn((1, 3, 3))
    gray = (torch.rand(20, 1, 3, 3) > 0.5).to(torch.uint8) * 255  # (20, 1, 3, 3), values in {0, 255}
    static, se_static = score_bpd(model, gray, "static", ScoreConfig(), progress=False)
    dynamic, se_dynamic = score_bpd(model, gray, "dynamic", ScoreConfig(num_draws=5), progress=False)
    exact = model.bpd((gray > 0).float()).detach().double().numpy()
    np.testing.assert_allclose(static, exact, rtol=1e-6)
    np.testing.assert_allclose(dynamic, static, rtol=1e-6)
    np.testing.assert_allclose(se_dynamic, 0.0, atol=1e-9)
    assert (se_static == 0).all()


def test_static_thresholds_at_half() -> None:
    """gray 127 -> 0.498 -> 0, gray 128 -> 0.502 -> 1."""
    model = _random_fvsbn((1, 2, 2))
    gray = np.array([[[[127, 128], [0, 255]]]], dtype=np.uint8)
    bpd, _ = score_bpd(model, gray, "static", ScoreConfig(), progress=False)
    expected = model.bpd(torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])).detach().double().numpy()
    np.testing.assert_allclose(bpd, expected, rtol=1e-6)


def test_dynamic_converges_to_exact_expectation() -> None:
    """E[BPD] = sum over all 16 binary 2x2 images b of P(draw = b) * BPD(b), and the SE is right."""
    model = _random_fvsbn((1, 2, 2))
    gray = np.array([[[[30, 200], [128, 90]]], [[[250, 5], [60, 170]]]], dtype=np.uint8)  # (2, 1, 2, 2)
    p = torch.tensor(gray, dtype=torch.float64).flatten(1) / 255.0  # (2, 4)
    b = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)), dtype=torch.float64)  # (16, 4)
    prob = torch.prod(torch.where(b[None] == 1, p[:, None], 1 - p[:, None]), dim=-1)  # (2, 16)
    bpd_b = model.bpd(b.float().view(16, 1, 2, 2)).detach().double()  # (16,)
    exact = (prob * bpd_b).sum(1)  # (2,)
    std = ((prob * bpd_b**2).sum(1) - exact**2).sqrt()  # (2,)

    s = 4000
    mean, se = score_bpd(model, gray, "dynamic", ScoreConfig(num_draws=s, seed=3), progress=False)
    np.testing.assert_allclose(se, std.numpy() / math.sqrt(s), rtol=0.1)
    assert (np.abs(mean - exact.numpy()) < 4 * se).all()


def test_dynamic_is_seeded_and_independent_of_batch_size() -> None:
    model = _random_fvsbn((1, 3, 3))
    gray = torch.randint(0, 256, (7, 1, 3, 3), dtype=torch.uint8)
    a = score_bpd(model, gray, "dynamic", ScoreConfig(num_draws=8, batch_size=3), progress=False)
    b = score_bpd(model, gray, "dynamic", ScoreConfig(num_draws=8, batch_size=100), progress=False)
    c = score_bpd(model, gray, "dynamic", ScoreConfig(num_draws=8, seed=1), progress=False)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert not np.allclose(a[0], c[0])


def test_floats_in_unit_interval_match_uint8() -> None:
    model = _random_fvsbn((1, 3, 3))
    gray = torch.randint(0, 256, (5, 1, 3, 3), dtype=torch.uint8)
    for mode in ("static", "dynamic"):
        from_uint8 = score_bpd(model, gray, mode, ScoreConfig(), progress=False)[0]
        from_float = score_bpd(model, gray.float() / 255, mode, ScoreConfig(), progress=False)[0]
        np.testing.assert_allclose(from_float, from_uint8, rtol=1e-6)


def test_256_level_model_scores_exactly() -> None:
    model = Categorical256((1, 2, 3))
    gray = torch.randint(0, 256, (4, 1, 2, 3), dtype=torch.uint8)
    bpd, se = score_bpd(model, gray, None, ScoreConfig(), progress=False)
    logp = torch.log_softmax(model.logits.detach().double(), 0)  # (256, 1, 2, 3)
    picked = torch.gather(logp.expand(4, -1, -1, -1, -1), 1, gray.long()[:, None]).squeeze(1)  # (4, 1, 2, 3)
    expected = -picked.flatten(1).sum(1) / (6 * math.log(2))
    np.testing.assert_allclose(bpd, expected.numpy(), rtol=1e-5)
    assert (se == 0).all()
    np.testing.assert_allclose(
        score_bpd(model, gray.float() / 255, None, ScoreConfig(), progress=False)[0], bpd
    )
    with pytest.raises(ValueError, match="multiples of 1/255"):
        score_bpd(model, gray.float() / 255 + 0.001, None, ScoreConfig(), progress=False)
    with pytest.raises(ValueError, match="binarization must be None"):
        score_bpd(model, gray, "static", ScoreConfig(), progress=False)


def test_errors_name_the_problem() -> None:
    model = _random_fvsbn((1, 2, 2))
    cfg = ScoreConfig()
    ok = np.zeros((3, 1, 2, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"model trained on shape \(1, 2, 2\), got \(1, 3, 3\)"):
        score_bpd(model, np.zeros((3, 1, 3, 3), dtype=np.uint8), "static", cfg)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, C, H, W\)"):
        score_bpd(model, np.zeros((3, 2, 2), dtype=np.uint8), "static", cfg)
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        score_bpd(model, np.full((3, 1, 2, 2), 1.5, dtype=np.float32), "static", cfg)
    with pytest.raises(ValueError, match=r"gray levels in \[0, 255\]"):
        score_bpd(model, np.full((3, 1, 2, 2), 300, dtype=np.int16), "static", cfg)
    with pytest.raises(TypeError, match="bool"):
        score_bpd(model, ok.astype(bool), "static", cfg)
    with pytest.raises(ValueError, match="needs binarization 'static' or 'dynamic'"):
        score_bpd(model, ok, None, cfg)
    with pytest.raises(ValueError, match="num_draws"):
        ScoreConfig(num_draws=1)
