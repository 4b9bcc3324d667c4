"""PixelDefend purification: the window, the greedy choice, fast = reference decoding, BPDA, the sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ardetect.classifier import ClassifierConfig, SmallCNN
from ardetect.models import build_model
from ardetect.models.base import ARModel
from ardetect.purify import (
    BPDAPurifier,
    DecodeStats,
    ReceptiveField,
    evaluation_sets,
    markdown_section,
    purify,
    purify_reference,
    receptive_field,
    window,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(arch: str, shape: tuple[int, int, int] = (1, 10, 10), seed: int = 0) -> ARModel:
    """A random 8-bit model whose receptive field is smaller than the image (crops are exercised)."""
    torch.manual_seed(seed)
    if arch == "pixelcnn":  # reach 2 + 2 * 1 = 4
        hp = {"channels": 8, "blocks": 2, "kernel_size": 5, "block_kernel_size": 3, "head_channels": 8}
    else:  # reach 1 + 2 * 1 = 3 columns, 4 rows
        hp = {"channels": 8, "layers": 3, "kernel_size": 3, "input_kernel_size": 3, "head_channels": 8}
    model = build_model(arch, shape, levels=256, **hp).eval()
    with torch.no_grad():  # spread the logits: distinct argmaxes, far from ties
        for p in model.parameters():
            p.mul_(3.0)
    return model


def random_images(n: int, shape: tuple[int, int, int], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).float()


@pytest.mark.parametrize("arch", ["pixelcnn", "gated_pixelcnn"])
def test_receptive_field_matches_input_gradients(arch: str) -> None:
    """Inputs with a nonzero gradient on the logits at (r, c) lie in the field, and reach its edges."""
    model = tiny(arch, (1, 14, 14))
    field = receptive_field(model)
    r, c = 11, 7
    x = (torch.rand(1, 1, 14, 14) * 255).requires_grad_(True)
    model(x)[0, :, 0, r, c].sum().backward()
    assert x.grad is not None
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    assert rows.min() == r - field.up and rows.max() <= r  # tight above, causal below
    assert cols.min() == c - field.left and cols.max() <= c + field.right
    if arch == "gated_pixelcnn":  # no blind spot: the right edge is reached too
        assert cols.max() == c + field.right
    same_row = cols[rows == r]
    assert (same_row < c).all()  # never the pixel itself or anything after it


@pytest.mark.parametrize("arch", ["pixelcnn", "gated_pixelcnn"])
@pytest.mark.parametrize("eps", [2, 16, 255])
def test_fast_decoding_equals_full_forward_decoding(arch: str, eps: int) -> None:
    """Bit-identical levels (no tolerance), from x and from an arbitrary first guess."""
    model = tiny(arch, seed=eps)
    x = random_images(3, (1, 10, 10), seed=eps)
    reference = purify_reference(model, x, eps)
    stats = DecodeStats()
    fast = purify(model, x, eps, stats=stats)
    assert torch.equal(fast, reference)
    assert stats.passes < 100  # fewer passes than pixels
    assert torch.equal(purify(model, x, eps, init=random_images(3, (1, 10, 10), seed=99)), reference)
    assert (reference != x).any()  # purification did something


def test_pixelcnnpp_purifies_in_the_window_and_fast_equals_reference() -> None:
    """PixelDefend's own model (its U-net has no config-derived field: the whole image is the crop) on an
    image whose sizes do not halve evenly: fast decoding equals the reference bit for bit, and purified
    levels are whole numbers in the window and in 0..255."""
    torch.manual_seed(0)
    hp = {"filters": 6, "resnets_per_stage": 1, "stages": 2, "mixtures": 3}
    model = build_model("pixelcnnpp", (1, 5, 7), levels=256, **hp).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    assert receptive_field(model) == ReceptiveField(up=5, left=7, right=7)
    x = random_images(3, (1, 5, 7))
    for eps in (2, 16):
        reference = purify_reference(model, x, eps)
        assert torch.equal(purify(model, x, eps), reference)
        lo, hi = window(x, eps)
        assert ((reference >= lo) & (reference <= hi)).all() and torch.equal(reference, reference.round())
        assert reference.min() >= 0 and reference.max() <= 255 and (reference != x).any()


def test_greedy_choice_is_the_windowed_argmax_of_the_marginalized_joint() -> None:
    """On 1x3 images, each pixel's conditional by brute force: p(x_<=i) summed from ``log_prob`` over
    every value of the later pixels (256^2 images for the first pixel)."""
    model = tiny("pixelcnn", (1, 1, 3))
    x = torch.tensor([[[[0.0, 130.0, 254.0]]]])  # windows clipped at 0 and at 255
    eps = 2
    levels = torch.arange(256.0)
    chosen: list[float] = []
    for i in range(3):
        lo, hi = max(0.0, x[0, 0, 0, i].item() - eps), min(255.0, x[0, 0, 0, i].item() + eps)
        candidates = torch.arange(lo, hi + 1)
        later = torch.cartesian_prod(*[levels] * (2 - i)).reshape(-1, 2 - i) if i < 2 else torch.zeros(1, 0)
        marginal = []
        for v in candidates:
            prefix = torch.tensor([*chosen, v.item()]).expand(len(later), i + 1)
            images = torch.cat([prefix, later], 1).view(-1, 1, 1, 3)  # (256^(2-i), 1, 1, 3)
            with torch.no_grad():
                logp = torch.cat([model.log_prob(b) for b in images.split(8192)])
            marginal.append(torch.logsumexp(logp.double(), 0))
        chosen.append(candidates[int(torch.stack(marginal).argmax())].item())
    assert purify(model, x, eps).flatten().tolist() == chosen
    assert purify_reference(model, x, eps).flatten().tolist() == chosen


@pytest.mark.parametrize("favoured", [0, 255])
def test_purified_images_stay_in_the_window_and_in_range(favoured: int) -> None:
    """A model whose logits rise toward one end of the levels moves every pixel to the window's edge on
    that side, no further: min(x + eps, 255) or max(x - eps, 0)."""
    model = tiny("pixelcnn")
    slope = torch.arange(256.0) * (1e3 if favoured == 255 else -1e3)
    last = model.head[-1]  # type: ignore[index]
    assert isinstance(last, nn.Conv2d) and last.bias is not None
    with torch.no_grad():
        last.bias += slope  # the logits' last layer: monotone in the level, everywhere
    x = random_images(4, (1, 10, 10))
    for eps in (0, 5, 40):
        y = purify(model, x, eps)
        expected = (x + eps).clamp(max=255) if favoured == 255 else (x - eps).clamp(min=0)
        assert torch.equal(y, expected)


def test_bpda_forward_is_purified_and_gradient_is_identity() -> None:
    """Output = classifier(purify(x)); d/dx = the classifier's gradient at the purified image."""
    density = tiny("pixelcnn", (1, 8, 8))
    torch.manual_seed(0)
    clf = SmallCNN((1, 8, 8), ClassifierConfig(channels=(4, 4), hidden=8, dropout=0.0)).eval()
    wrapped = BPDAPurifier(clf, density, eps_defend=8)
    x = (random_images(2, (1, 8, 8)) / 255).requires_grad_(True)
    weights = torch.randn(2, 10)
    (wrapped(x) * weights).sum().backward()
    purified = (purify(density, (x.detach() * 255).round(), 8) / 255).requires_grad_(True)
    out = clf(purified)
    (out * weights).sum().backward()
    assert torch.allclose(wrapped(x.detach()), out.detach())
    assert x.grad is not None and purified.grad is not None
    assert torch.equal(x.grad, purified.grad)
    assert x.grad.abs().sum() > 0
    assert not torch.equal(purified.detach(), x.detach())  # the purified image is another point


def _save_set(path: Path, attack: str, eps: float, index: np.ndarray, failed: np.ndarray) -> None:
    n = len(index)
    adversarial = np.full((n, 1, 4, 4), 7, np.uint8)
    adversarial[failed] = 0  # Foolbox's failure sentinel
    np.savez(
        path,
        attack=attack,
        epsilon=eps,
        source_index=index,
        label=index % 10,
        adversarial=adversarial,
        failed=failed,
    )


def test_evaluation_sets_drop_failed_attacks_and_pair_the_originals(tmp_path: Path) -> None:
    images = np.arange(20, dtype=np.uint8)[:, None, None, None] * np.ones((1, 1, 4, 4), np.uint8)
    labels = np.arange(20) % 10
    index = np.array([3, 5, 8, 9, 12])
    _save_set(tmp_path / "pgd_e8.npz", "pgd", 8 / 255, index, np.zeros(5, bool))
    _save_set(tmp_path / "cw.npz", "cw", np.nan, index[:3], np.array([False, True, False]))
    sets = evaluation_sets(images, labels, [tmp_path / "cw.npz", tmp_path / "pgd_e8.npz"], 4)
    assert list(sets) == ["clean", "cw", "pgd_e8"]
    assert sets["clean"][0][:, 0, 0, 0].tolist() == [3, 5, 8, 9]
    assert sets["clean"][1].tolist() == [3, 5, 8, 9]
    assert sets["cw"][1].tolist() == [3, 8] and (sets["cw"][0] == 7).all()
    assert len(sets["pgd_e8"][1]) == 4
    _save_set(tmp_path / "other.npz", "fgsm", 8 / 255, np.array([3, 6, 8]), np.zeros(3, bool))
    with pytest.raises(ValueError, match="other originals"):
        evaluation_sets(images, labels, [tmp_path / "pgd_e8.npz", tmp_path / "other.npz"], 4)


def test_markdown_section_reports_the_strongest_attack() -> None:
    def row(before: float, after: float, n: int = 10) -> dict[str, float]:
        return {"accuracy_before": before, "accuracy_after": after, "n": float(n)}

    metrics = {
        "pixelcnn_8bit": {
            "16": {
                "clean": row(1.0, 0.9),
                "noise_e25": row(0.1, 0.9),  # a control: never the strongest attack
                "fgsm_e8": row(0.6, 0.8),
                "cw": row(0.2, 0.7, 9),
                "bpda_pgd_e8": row(0.5, 0.3, 4),
            },
            "32": {
                "clean": row(1.0, 0.8),
                "noise_e25": row(0.1, 0.9),
                "fgsm_e8": row(0.6, 0.75),
                "cw": row(0.2, 0.85, 9),
                "bpda_pgd_e8": row(0.4, 0.8, 4),
            },
        }
    }
    text = markdown_section(metrics)
    assert "| `cw` | 9 | 20% | 70% | 85% |" in text
    assert "| `bpda_pgd_e8` (against ε=32) | 4 | 40% | — | 80% |" in text
    strongest, bounded = (line for line in text.splitlines() if "before purification: `" in line)
    assert "`cw`, accuracy 20%" in strongest  # the noise control's 10% is no attack
    assert "30% at ε_defend=16 (`bpda_pgd_e8`), 75% at ε_defend=32 (`fgsm_e8`)" in strongest
    assert "`fgsm_e8`, accuracy 60%" in bounded  # cw is unbounded: outside PixelDefend's threat model
    assert "30% at ε_defend=16 (`bpda_pgd_e8`), 75% at ε_defend=32 (`fgsm_e8`)" in bounded
    assert text.index("| `clean` |") < text.index("| `fgsm_e8` |") < text.index("| `cw` |")
    assert "63% to 84%" in text


def test_bpda_needs_an_8bit_model() -> None:
    binary = build_model("pixelcnn", (1, 8, 8), levels=2, channels=4, blocks=1, head_channels=4)
    with pytest.raises(ValueError, match="8-bit model"):
        BPDAPurifier(nn.Identity(), binary, 8)


def test_params_reject_a_binary_model_and_more_bpda_images_than_images() -> None:
    from ardetect.configs import ParamsError, read_params_file
    from ardetect.params import parse_params

    raw = read_params_file(Path(__file__).resolve().parents[1] / "params.yaml")
    raw["purify"] = {**raw["purify"], "model": "pixelcnn", "num_images": 8, "bpda_images": 9}
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert "purify.model = 'pixelcnn': purification needs an 8-bit model" in str(err.value)
    assert "purify.bpda_images = 9: at most purify.num_images = 8" in str(err.value)
