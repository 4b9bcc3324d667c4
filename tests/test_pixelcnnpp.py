"""What is particular to PixelCNN++ (``pixelcnnpp``): the discretized logistic mixture, the U-net's
receptive field, its 8-bit-only config, training through a model entry, and entropy coding.

Causality by gradients, the 256^2-image normalisation of a 1x2 model (``log_prob`` summed, slow tier),
sampling, the likelihood contract and checkpoints run in tests/test_models.py from ``toys.TINY``;
purification in tests/test_purify.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from toys import TINY, digits_gray, randomize, tiny_model

from ardetect.compression import batch_sizes, decode, encode
from ardetect.models import ARModel, build_model, load_model
from ardetect.models.pixelcnnpp import PixelCNNPP, _scale, logistic_mixture_log_prob
from ardetect.training import ENTRY_CLASSES, TrainParams, TrainSection, fit, model_entry_of, model_problems

pytestmark = pytest.mark.usefixtures("one_thread")

LEVELS = torch.arange(256)


def mixture_params(
    means: list[float], log_scales: list[float], logits: list[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """One pixel per case: (N, 3M, 1, 1) from N x M lists of each parameter (M components per case)."""
    rows = [torch.tensor(v, dtype=dtype).view(len(v), -1) for v in (logits, means, log_scales)]
    return torch.cat(rows, 1)[:, :, None, None]


def random_params(n: int, m: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random mixtures with extreme cases mixed in: means at and beyond the edges, scales at the -7 clamp
    and far below it, huge scales, weights that put all mass on one component. (n, 3m, 1, 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = 10 * torch.randn(n, m, generator=g)
    means = torch.empty(n, m).uniform_(-1.2, 1.2, generator=g)
    log_scales = torch.empty(n, m).uniform_(-9.0, 2.0, generator=g)
    edge = torch.tensor([-1.0, 1.0, -1 - 1 / 255, 1 + 1 / 255, -3.0, 3.0, 0.0, 1 - 2 / 255])
    means[: len(edge), 0] = edge  # at the edges, between bins, far outside
    log_scales[: len(edge), 0] = -7.0
    log_scales[len(edge) : 2 * len(edge), 0] = -30.0  # clamped to -7
    log_scales[2 * len(edge) : 2 * len(edge) + 3, 0] = torch.tensor([10.0, 40.0, 100.0])  # very flat
    logits[: 2 * len(edge) + 3, 0] = 50.0  # the extreme component carries (almost) all the weight
    return torch.cat([logits, means, log_scales], 1).to(dtype)[:, :, None, None]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_mixture_sums_to_one_over_the_256_levels(dtype: torch.dtype, tol: float) -> None:
    params = random_params(200, 3, dtype)
    every = logistic_mixture_log_prob(params)  # (200, 256, 1, 1)
    assert every.dtype == dtype and torch.isfinite(every).all()
    assert torch.logsumexp(every.double(), 1).abs().max().item() < tol
    # the evaluation at given levels (log_prob's) gives the same numbers as the one at every level
    picks = [0, 1, 2, 128, 253, 254, 255]
    at = torch.cat([logistic_mixture_log_prob(params, torch.full((200, 1, 1, 1), k)) for k in picks], 1)
    torch.testing.assert_close(at, every[:, picks], atol=1e-6, rtol=1e-6)


def direct(params: torch.Tensor) -> torch.Tensor:
    """P(X = k) straight from the definition in float64: CDF differences of each logistic, by
    ``torch.sigmoid``, with the edge levels taking the tails, mixed by softmax weights: (N, 256)."""
    logits, means, log_scales = (t[:, :, 0, 0].double() for t in params.chunk(3, 1))  # (N, M)
    x = (2 * LEVELS.double() / 255 - 1).view(1, 1, 256)
    scale = log_scales.clamp(min=-7).exp().unsqueeze(2)
    cdf_hi = torch.sigmoid((x + 1 / 255 - means.unsqueeze(2)) / scale)  # (N, M, 256)
    cdf_lo = torch.sigmoid((x - 1 / 255 - means.unsqueeze(2)) / scale)
    cdf_hi[..., -1], cdf_lo[..., 0] = 1.0, 0.0
    return (torch.softmax(logits, 1).unsqueeze(2) * (cdf_hi - cdf_lo)).sum(1)


def test_mixture_matches_cdf_differences_of_logistics() -> None:
    params = mixture_params(
        means=[[0.0, 0.5], [-1.0, 1.0], [0.3, -0.7], [1.2, -0.2]],
        log_scales=[[-2.0, -4.0], [-3.0, -3.0], [-1.0, -7.0], [0.5, -5.5]],
        logits=[[0.0, 0.0], [0.0, 0.0], [-2.0, 3.0], [0.0, 5.0]],
    )
    want = direct(params)  # (4, 256)
    got = logistic_mixture_log_prob(params)[:, :, 0, 0].double().exp()
    # float32: a bin edge is rounded by ~6e-8, times 1/scale up to e^7 in the standardised edge
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-4)
    got64 = logistic_mixture_log_prob(params.double())[:, :, 0, 0].exp()
    torch.testing.assert_close(got64, want, atol=1e-15, rtol=1e-12)
    # means on the centres of levels 0 and 255: each edge level holds its component's lower (upper) half and
    # the half bin beyond: just over 1/4 of the mixture
    assert 0.25 < want[1, 0] < 0.27 and 0.25 < want[1, 255] < 0.27


def test_tails_and_the_mid_point_limit_stay_finite_and_accurate() -> None:
    """Bins deep in a tail keep their (tiny) log-probability instead of -inf; log(1 - exp(-d)) of the
    standardised bin width is accurate in each of its three ranges, also where d underflows float32
    (log-scale 100: the mid-point end, log d from the log-scale); gradients stay finite everywhere (the
    dropped branches of each ``where`` too, and no 1/d overflows)."""
    assert math.exp(-100) * 2 / 255 < torch.finfo(torch.float32).tiny
    log_scale = torch.linspace(-7.0, 30.0, 5001, dtype=torch.float64)
    d = 2 / 255 * torch.exp(-log_scale)
    exact = torch.log(-torch.expm1(-d))
    torch.testing.assert_close(_scale(log_scale)[1], exact, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(_scale(log_scale.float())[1].double(), exact, rtol=1e-5, atol=0)
    params = mixture_params(
        means=[[-1.0], [0.0], [0.4], [0.2], [-0.3]],
        log_scales=[[-7.0], [100.0], [88.0], [20.0], [80.0]],
        logits=[[0.0], [0.0], [0.0], [0.0], [0.0]],
    ).requires_grad_(True)
    log_p = logistic_mixture_log_prob(params)[:, :, 0, 0]  # (5, 256)
    assert torch.isfinite(log_p).all()
    assert log_p[0, 255].item() < -1000  # level 255 under a sharp logistic at level 0: tiny, not 0
    want = logistic_mixture_log_prob(params.detach().double())[:, :, 0, 0]
    torch.testing.assert_close(log_p.double(), want, rtol=1e-5, atol=1e-4)
    (log_p.sum() + logistic_mixture_log_prob(params, torch.full((5, 1, 1, 1), 7)).sum()).backward()
    assert params.grad is not None and torch.isfinite(params.grad).all()


def test_forward_is_normalised_and_log_prob_is_its_likelihood() -> None:
    """``forward``'s 256 log-probabilities are normalised; ``log_prob`` (at the observed levels only)
    equals the shared categorical likelihood of ``forward``, also for a peaked random model."""
    model = tiny_model("pixelcnnpp", (1, 3, 4), 256)
    randomize(model, gain=3.0)
    x = torch.randint(0, 256, (6, 1, 3, 4)).float()
    with torch.no_grad():
        logits = model(x)  # (6, 256, 1, 3, 4)
        assert logits.shape == (6, 256, 1, 3, 4)
        assert torch.logsumexp(logits.double(), 1).abs().max() < 1e-5
        torch.testing.assert_close(model.log_prob(x), ARModel.log_prob(model, x), atol=1e-4, rtol=1e-6)
        assert model.training_nll(x).item() == pytest.approx(-model.log_prob(x).mean().item())
    with pytest.raises(ValueError, match="not class-conditional"):
        model.log_prob(x, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="integer gray levels"):
        model.log_prob(x / 255)


def test_continuous_and_integer_inputs() -> None:
    """uint8/long and float levels give the same logits; floats between levels have finite gradients."""
    model = tiny_model("pixelcnnpp", (1, 4, 5), 256)
    x = torch.randint(0, 256, (3, 1, 4, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.float()))
        torch.testing.assert_close(model(x.to(torch.uint8)), model(x.float()))
    v = (torch.rand(3, 1, 4, 5) * 255).requires_grad_(True)
    model(v)[:, 7].sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def dependence_matrix(model: ARModel) -> torch.Tensor:
    """(D, D) bool: [i, j] when the logits at raster position i have a nonzero gradient for input j
    (one batched backward pass: a random weighting of position i's 256 logits per row)."""
    _, h, w = model.image_shape
    d = h * w
    x = torch.randint(0, 256, (1, 1, h, w)).float().requires_grad_(True)
    logits = model(x)  # (1, 256, 1, H, W)
    pick = torch.eye(d).view(d, 1, 1, 1, h, w)  # row i selects position i
    weights = torch.randn(d, 1, 256, 1, 1, 1, generator=torch.Generator().manual_seed(0)) * pick
    (grad,) = torch.autograd.grad(logits, x, grad_outputs=weights, is_grads_batched=True)
    return grad.reshape(d, d) != 0


@pytest.mark.parametrize("stages", [2, 3])
def test_receptive_field_covers_every_earlier_pixel_of_8x8(stages: int) -> None:
    """With 2 resnets per stage (4 * 2 + 2 = 10 >= 7 columns at full resolution) every output sees every
    earlier pixel of an 8x8 image, through the down- and up-sampling paths, and nothing at or after it."""
    model = build_model(
        "pixelcnnpp", (1, 8, 8), 256, filters=4, resnets_per_stage=2, stages=stages, mixtures=2
    )
    randomize(model)
    dep = dependence_matrix(model.eval())
    earlier = torch.ones(64, 64, dtype=torch.bool).tril(-1)
    assert not (dep & ~earlier).any(), "an output depends on its own pixel or a later one"
    assert (dep | ~earlier).all(), (
        f"outputs missing earlier pixels: {(~dep & earlier).any(1).nonzero().flatten().tolist()}"
    )


def test_receptive_field_is_finite_on_odd_rows() -> None:
    """With 1 resnet per stage the full-resolution layers reach 4 * 1 + 2 = 6 columns: on odd rows the
    first pixel misses the last pixel of the row above and the last pixel misses the first of its row
    (coarse positions stand for even rows and columns); every other output sees everything before it."""
    model = build_model("pixelcnnpp", (1, 8, 8), 256, filters=4, resnets_per_stage=1, stages=2, mixtures=2)
    randomize(model)
    dep = dependence_matrix(model.eval())
    earlier = torch.ones(64, 64, dtype=torch.bool).tril(-1)
    assert not (dep & ~earlier).any()
    missing = {(i, j) for i, j in (~dep & earlier).nonzero().tolist()}
    expected = {(8 * r, 8 * (r - 1) + 7) for r in (1, 3, 5, 7)} | {(8 * r + 7, 8 * r) for r in (1, 3, 5, 7)}
    assert missing == expected


def test_config_and_levels_are_checked() -> None:
    with pytest.raises(ValueError, match="supports levels"):
        build_model("pixelcnnpp", (1, 8, 8), levels=2)
    with pytest.raises(ValueError, match="single-channel"):
        build_model("pixelcnnpp", (3, 8, 8), levels=256)
    for bad in ({"dropout": 1.0}, {"mixtures": 0}, {"stages": 0}, {"filter": 8}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            build_model("pixelcnnpp", (1, 8, 8), levels=256, **bad)


def test_odd_sizes_and_dropout() -> None:
    """Sizes that do not halve evenly (7x5 -> 4x3 -> 2x2) give logits of the image's size; dropout
    changes the training-mode outputs only."""
    model = build_model("pixelcnnpp", (1, 7, 5), 256, filters=4, stages=3, mixtures=2, dropout=0.5)
    assert isinstance(model, PixelCNNPP) and model.sizes == [(7, 5), (4, 3), (2, 2)]
    x = torch.randint(0, 256, (2, 1, 7, 5)).float()
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert model(x).shape == (2, 256, 1, 7, 5) and torch.equal(model(x), model(x))


def test_bf16_autocast_keeps_the_likelihood_in_float32() -> None:
    """Under autocast (the GPU recipe; bf16 on the CPU here) the mixture is still evaluated in float32."""
    model = tiny_model("pixelcnnpp", (1, 4, 4), 256)
    x = torch.randint(0, 256, (4, 1, 4, 4)).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        nll, logits = model.training_nll(x), model(x)
    assert nll.dtype == logits.dtype == torch.float32
    assert torch.isfinite(nll) and torch.logsumexp(logits.double(), 1).abs().max() < 1e-5
    assert nll.item() == pytest.approx(model.training_nll(x).item(), rel=0.05)


def test_a_model_entry_trains_it(tmp_path: Path) -> None:
    """``arch: pixelcnnpp`` in params.yaml: the entry class comes from the registry, 8-bit and
    unconditional only, and ``fit`` trains the model it builds (8x8 digits, two epochs)."""
    assert "pixelcnnpp" in ENTRY_CLASSES
    hparams = {"filters": 8, "resnets_per_stage": 1, "stages": 2, "mixtures": 3}
    entry = model_entry_of({"arch": "pixelcnnpp", "levels": 256, "hparams": hparams})
    bad = {
        "a": model_entry_of({"arch": "pixelcnnpp", "hparams": hparams}),  # levels 2 by default
        "b": model_entry_of({"arch": "pixelcnnpp", "levels": 256, "conditional": True}),
    }
    problems = "\n".join(model_problems(TrainSection(models=[]), bad))
    assert "models.a.levels = 2: pixelcnnpp supports [256]" in problems
    assert "models.b.conditional = true: pixelcnnpp has no class-conditional form" in problems
    torch.manual_seed(0)
    model = entry.build((1, 8, 8))
    assert isinstance(model, PixelCNNPP)
    gray, _ = digits_gray()
    data = torch.as_tensor(gray).float()
    train, val = data[:512], data[512:640]
    with torch.no_grad():
        before = -model.log_prob(val).mean().item()
    params = TrainParams(batch_size=64, epochs=2, lr=0.01, patience=5, progress=False, eval_batch_size=64)
    result = fit(model, train, val, params, checkpoint_path=tmp_path / "best.pt", device=torch.device("cpu"))
    assert result.best_val_nll < before - 20, (before, result.best_val_nll)  # nats per 64-pixel image
    reloaded = load_model(tmp_path / "best.pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.log_prob(val), model.log_prob(val))


def test_entropy_coding_round_trip() -> None:
    """ANS with the mixture's conditionals: lossless, and the stream costs -log2 p(x) plus a few bits
    (a later pixel never changes an earlier pixel's logits, to the last bit, through the U-net)."""
    model = build_model("pixelcnnpp", (1, 5, 5), 256, **TINY["pixelcnnpp"].hparams).eval()
    randomize(model, gain=2.0)
    images = model.sample(4, generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy()
    sizes = batch_sizes(len(images), 3)
    stream = encode(model, images, sizes)
    np.testing.assert_array_equal(decode(model, stream.words, sizes), images)
    with torch.no_grad():
        ideal = float(-model.log_prob(torch.as_tensor(images).float()).double().sum()) / math.log(2)
    assert -1.0 <= stream.bits - ideal <= 64
