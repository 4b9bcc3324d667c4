"""The fast NADE and PixelCNN kernels compute the same function as the plain textbook formulations.

The references below are written independently of the models' code: NADE's recursion as an explicit
running sum over pixels with a sigmoid, PixelCNN as dense ``weight * mask`` convolutions in NCHW. Both
are fed the model's own parameters (random, biases non-zero), so any difference is the kernel's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ardetect.models import build_model
from ardetect.models.gated_pixelcnn import GatedPixelCNN
from ardetect.models.nade import NADE
from ardetect.models.pixelcnn import PixelCNN, ResidualBlock


def nade_reference(model: NADE, x: Tensor) -> Tensor:
    """Larochelle & Murray's recursion: a_i = c + sum_{j<i} v_j W_j, logit_i = b_i + V_i . sigmoid(a_i)."""
    v = model.scale_input(x).flatten(1).double()  # (B, D)
    W, V, c, b = (p.double() for p in (model.W, model.V, model.c, model.b))
    a = c + torch.cumsum(v.unsqueeze(2) * W, 1) - v.unsqueeze(2) * W  # (B, D, H): exclusive running sum
    return ((torch.sigmoid(a) * V).sum(2) + b).view(x.shape)  # (B, C, H, W)


def masked_conv_reference(x: Tensor, weight: Tensor, bias: Tensor, mask_type: str) -> Tensor:
    k = weight.shape[-1]
    mask = torch.zeros(k, k, dtype=x.dtype)
    mask[: k // 2] = 1
    mask[k // 2, : k // 2 + (mask_type == "B")] = 1
    return F.conv2d(x, weight * mask, bias, padding=k // 2)


def pixelcnn_reference(model: PixelCNN, x: Tensor) -> Tensor:
    """The dense masked PixelCNN in NCHW, float64, from the model's parameters."""
    p = {k: v.double().contiguous() for k, v in model.named_parameters()}
    x = model.scale_input(x).double()  # (B, 1, H, W)
    h = masked_conv_reference(x, p["input_conv.weight"], p["input_conv.bias"], "A")
    for i, block in enumerate(model.blocks):
        assert isinstance(block, ResidualBlock)
        pre = f"blocks.{i}."
        out = F.conv2d(F.relu(h), p[pre + "down.weight"], p[pre + "down.bias"])
        out = masked_conv_reference(F.relu(out), p[pre + "conv.weight"], p[pre + "conv.bias"], "B")
        h = h + F.conv2d(F.relu(out), p[pre + "up.weight"], p[pre + "up.bias"])
    h = F.conv2d(F.relu(h), p["head.1.weight"], p["head.1.bias"])
    out = F.conv2d(F.relu(h), p["head.3.weight"], p["head.3.bias"])
    return out if model.levels == 2 else out.unsqueeze(2)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (biases too, and the masked-out weights, which must stay unused)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize(
    ("shape", "hidden", "batch"),
    [((1, 28, 28), 32, 37), ((1, 5, 7), 8, 3), ((1, 1, 2), 4, 1), ((3, 4, 4), 16, 20)],
)
def test_nade_matches_the_recursion(shape: tuple[int, int, int], hidden: int, batch: int) -> None:
    """Odd sizes on purpose: D not a multiple of the block, a batch not a multiple of the image chunk."""
    torch.manual_seed(0)
    model = build_model("nade", shape, hidden=hidden)
    assert isinstance(model, NADE)
    randomize(model, 1)
    x = torch.randint(0, 2, (batch, *shape)).float()
    ref = nade_reference(model, x)
    with torch.inference_mode():
        assert torch.allclose(model(x).double(), ref, atol=1e-5, rtol=1e-5)
    # continuous inputs (gradient tests and attacks feed them) and the gradients of every parameter
    xc = torch.rand(batch, *shape)
    model(xc).sum().backward()
    fast = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    nade_reference(model, xc).sum().backward()
    for k, p in model.named_parameters():
        assert p.grad is not None
        assert torch.allclose(fast[k].double(), p.grad.double(), atol=1e-4, rtol=1e-4), k


def test_nade_kernel_settings_do_not_change_the_function() -> None:
    """Block and chunk sizes are speed knobs only (one pixel per block, one image per chunk included)."""
    torch.manual_seed(0)
    model = build_model("nade", (1, 6, 6), hidden=8)
    assert isinstance(model, NADE)
    randomize(model, 2)
    x = torch.randint(0, 2, (9, 1, 6, 6)).float()
    ref = nade_reference(model, x)
    for block, chunk in [(1, 1), (2, 3), (6, 16), (100, 2)]:
        model.kernel_block, model.chunk_images = block, chunk
        assert torch.allclose(model(x).double(), ref, atol=1e-5), (block, chunk)


@pytest.mark.parametrize(
    ("shape", "hidden", "batch"),
    [((1, 28, 28), 32, 70), ((1, 5, 7), 8, 3), ((1, 1, 1), 4, 2), ((3, 4, 4), 16, 65)],
)
def test_nade_scoring_path_equals_the_training_path(
    shape: tuple[int, int, int], hidden: int, batch: int
) -> None:
    """Without autograd a large enough CPU batch streams over pixels (``streamed_logits``); with it, the
    blocked kernel runs. Both give the recursion's logits, for binary and continuous inputs."""
    torch.manual_seed(0)
    model = build_model("nade", shape, hidden=hidden)
    assert isinstance(model, NADE)
    randomize(model, 4)
    if batch < model.stream_min_batch:
        model.stream_min_batch = 1  # small shapes and batches stream too
    for x in (torch.randint(0, 2, (batch, *shape)).float(), torch.rand(batch, *shape)):
        v = x.flatten(1)
        assert not model.streams(v)
        blocked = model(x)
        with torch.no_grad():
            assert model.streams(v)
            streamed = model(x)
        with torch.inference_mode():
            assert torch.equal(model(x), streamed)
        assert streamed.shape == x.shape and streamed.is_contiguous()
        assert torch.allclose(streamed, blocked, atol=1e-5, rtol=1e-5)
        assert torch.allclose(streamed.double(), nade_reference(model, x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.stream_min_batch = batch + 1
        assert not model.streams(v)  # a smaller batch than the threshold takes the blocked kernel


@pytest.mark.parametrize("levels", [2, 256])
def test_pixelcnn_matches_dense_masked_convolutions(levels: int) -> None:
    torch.manual_seed(0)
    model = build_model("pixelcnn", (1, 9, 8), levels=levels, channels=8, blocks=2, head_channels=8)
    assert isinstance(model, PixelCNN)
    randomize(model, 3)
    x = torch.randint(0, levels, (5, 1, 9, 8)).float()
    out = model(x)
    ref = pixelcnn_reference(model, x)
    assert out.shape == ref.shape
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-4)
    if levels > 2:  # stored levels-last, so cross-entropy runs over a contiguous dim; same values either way
        assert out.movedim(1, -1).is_contiguous() and not out.is_contiguous()
        with torch.no_grad():
            lp, lp_nchw = model.log_prob_from_logits(out, x), model.log_prob_from_logits(out.contiguous(), x)
        assert torch.allclose(lp, lp_nchw, atol=1e-4, rtol=1e-6)
    # the likelihood and its gradients agree too (the layout of the logits feeds cross-entropy)
    model.log_prob(x).sum().backward()
    fast = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.log_prob_from_logits(pixelcnn_reference(model, x), x).sum().backward()
    for k, p in model.named_parameters():
        assert p.grad is not None
        assert torch.allclose(fast[k].double(), p.grad.double(), atol=1e-3, rtol=1e-4), k


def test_gated_pixelcnn_levels_last_logits_equal_the_convolution_head() -> None:
    """The gated model's head stores 256-level logits levels-last (one addmm); the values, likelihoods
    and gradients are those of the plain 1x1 convolution head."""
    torch.manual_seed(0)
    model = build_model("gated_pixelcnn", (1, 6, 5), levels=256, channels=4, layers=3, head_channels=8)
    randomize(model, 3)
    x = torch.randint(0, 256, (3, 1, 6, 5)).float()
    out = model(x)
    assert out.movedim(1, -1).is_contiguous() and not out.is_contiguous()
    model.log_prob(x).sum().backward()
    fast = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert isinstance(model, GatedPixelCNN)
    model.head.matmul_last = False  # the nn.Conv2d path
    ref = model(x)
    assert ref.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    model.log_prob(x).sum().backward()
    slow = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert slow.keys() == fast.keys() and "head.3.weight" in fast
    for k, grad in slow.items():
        assert torch.allclose(fast[k], grad, atol=1e-4, rtol=1e-4), k


def test_pixelcnn_checkpoints_load_into_either_memory_format() -> None:
    """Channels-last weights are a layout, not new values: an NCHW state_dict (older checkpoints) loads
    and gives the same outputs, and the seeded initialisation is the plain nn.Conv2d one."""
    torch.manual_seed(0)
    model = build_model("pixelcnn", (1, 6, 6), channels=4, blocks=1, head_channels=4)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 4, 7, padding=3)  # the first module built: same RNG draws
    assert torch.equal(model.state_dict()["input_conv.weight"], conv.weight)
    nchw = {k: v.contiguous() for k, v in model.state_dict().items()}
    fresh = build_model("pixelcnn", (1, 6, 6), channels=4, blocks=1, head_channels=4)
    fresh.load_state_dict(nchw)
    x = torch.randint(0, 2, (3, 1, 6, 6)).float()
    assert torch.equal(fresh(x), model(x))
