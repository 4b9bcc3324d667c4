"""Class-conditional density models p(x | y): causal and normalised for every class, an exact marginal
p(x) = (1/K) Σ_y p(x | y), samples from p(x | y), and clear errors when labels are missing or spurious.

The architectures under test are every registered one whose config has ``num_classes`` (the PixelCNN
family), so a newly conditional architecture joins these checks by itself.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import stats
from toys import TINY, all_images, randomize

from ardetect.models import REGISTRY, ARModel, build_model

K = 3
CONDITIONAL = sorted(
    name
    for name, cls in REGISTRY.items()
    if "num_classes" in {f.name for f in dataclasses.fields(cls.Config)}  # type: ignore[attr-defined]
)
CASES = [(name, levels) for name in CONDITIONAL for levels in REGISTRY[name].supported_levels]
IDS = [f"{n}-{lv}" for n, lv in CASES]


def conditional_model(name: str, shape: tuple[int, int, int], levels: int, seed: int = 0) -> ARModel:
    torch.manual_seed(seed)
    model = build_model(name, shape, levels=levels, num_classes=K, **TINY[name].hparams)
    randomize(model)  # the label tables start at zero: randomise them so the classes differ
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "label" in name_:
                p.mul_(4.0)  # and clearly so: a sampler that ignores y must fail the chi-square
    return model.eval()


def test_the_pixelcnn_family_is_conditional() -> None:
    assert {"pixelcnn", "gated_pixelcnn"} <= set(CONDITIONAL)


@pytest.mark.parametrize(("name", "levels"), CASES, ids=IDS)
def test_causal_by_gradients_for_every_class(name: str, levels: int) -> None:
    """For each label, the logits at pixel i depend on no input at or after i (the label is no pixel)."""
    shape = (1, 3, 4)
    model = conditional_model(name, shape, levels)
    d = math.prod(shape)
    x = torch.randint(0, levels, (2, *shape)).float()
    for label in range(K):
        y = torch.full((2,), label)
        for pos in range(d):
            xg = x.clone().requires_grad_(True)
            logits = model.logits_for(xg, y)
            out = logits.flatten(1)[:, pos] if levels == 2 else logits.flatten(2)[:, :, pos]
            weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(pos))
            (grad,) = torch.autograd.grad((out * weight).sum(), xg)
            dep = grad.abs().sum(0).flatten() > 0  # (D,)
            assert not dep[pos:].any(), f"{name} y={label}: logits at {pos} see inputs at/after it"


@pytest.mark.parametrize("name", CONDITIONAL)
def test_every_class_and_the_marginal_sum_to_one(name: str) -> None:
    """All 2^9 binary 3x3 images: Σ_x p(x | y) = 1 for each y, and Σ_x p(x) = 1 for the marginal."""
    model = conditional_model(name, (1, 3, 3), 2)
    images = all_images((1, 3, 3), 2)
    with torch.no_grad():
        per_class = model.class_log_probs(images).double()  # (512, K)
        marginal = model.log_prob(images).double()  # (512,)
    torch.testing.assert_close(per_class.exp().sum(0), torch.ones(K, dtype=torch.float64), atol=1e-4, rtol=0)
    assert marginal.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    # the classes really differ (a model ignoring y would pass the sums too)
    assert (per_class[:, 0] - per_class[:, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", CONDITIONAL)
def test_256_levels_every_class_sums_to_one(name: str) -> None:
    """All 256^2 8-bit 1x2 images for one class, and the marginal: total probability 1."""
    model = conditional_model(name, (1, 1, 2), 256)
    images = all_images((1, 1, 2), 256)
    with torch.no_grad():
        for_class = model.log_prob(images, torch.full((len(images),), K - 1)).double()
        marginal = model.log_prob(images).double()
    assert for_class.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    assert marginal.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(("name", "levels"), CASES, ids=IDS)
def test_marginal_is_the_uniform_mixture_of_the_conditionals(name: str, levels: int) -> None:
    """log p(x) = log (1/K) Σ_y p(x | y), computed here one label at a time with plain logits."""
    model = conditional_model(name, (1, 4, 4), levels)
    x = torch.randint(0, levels, (5, 1, 4, 4)).float()
    with torch.no_grad():
        rows = []
        for label in range(K):
            logits = model(x, torch.full((5,), label))
            if levels == 2:
                ll = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
            else:
                ll = -torch.nn.functional.cross_entropy(logits, x.long(), reduction="none")
            rows.append(ll.flatten(1).sum(1).double())
        expected = torch.logsumexp(torch.stack(rows, 1), 1) - math.log(K)
        got = model.log_prob(x).double()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CONDITIONAL)
def test_samples_follow_the_class_conditional(name: str) -> None:
    """20,000 draws of binary 2x2 images given y = 1 against exp(log p(x | 1)) (chi-square), and a
    class that differs from it (so a sampler ignoring y fails)."""
    model = conditional_model(name, (1, 2, 2), 2, seed=3)
    n = 20_000
    samples = model.sample(n, torch.Generator().manual_seed(0), y=torch.ones(n, dtype=torch.long))
    codes = (samples.flatten(1) * torch.tensor([8.0, 4.0, 2.0, 1.0])).sum(1).long()  # (n,) image index
    observed = torch.bincount(codes, minlength=16).double()
    images = all_images((1, 2, 2), 2)  # lexicographic: index == code
    with torch.no_grad():
        probs = model.class_log_probs(images).double().exp()  # (16, K)
    expected = probs[:, 1] / probs[:, 1].sum() * n  # normalised in float64 (sums to 1 within 1e-7)
    assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    other = probs[:, 0] / probs[:, 0].sum() * n
    assert stats.chisquare(observed.numpy(), other.numpy()).pvalue < 1e-6, "labels must change samples"


def test_default_sample_grid_cycles_through_the_classes() -> None:
    model = conditional_model("pixelcnn", (1, 2, 2), 2)
    assert model.sample_labels(7, None, torch.device("cpu")).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_labels_are_checked() -> None:
    cond = conditional_model("pixelcnn", (1, 3, 3), 2)
    plain = build_model("pixelcnn", (1, 3, 3), channels=4, blocks=1, head_channels=4)
    x = torch.zeros(2, 1, 3, 3)
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        cond.logits_for(x)
    with pytest.raises(ValueError, match=r"values in 0\.\.2"):
        cond.log_prob(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        cond.log_prob(x, torch.tensor([0]))
    with pytest.raises(ValueError, match="not class-conditional"):
        plain.log_prob(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not class-conditional"):
        plain.class_log_probs(x)
    with pytest.raises(ValueError, match="not class-conditional"):
        build_model("made", (1, 3, 3), hidden=[8]).sample(2, y=torch.tensor([0, 1]))


def test_unconditional_weights_are_unchanged_by_the_option() -> None:
    """num_classes = 0 keeps the architecture's parameters (and checkpoints) exactly as before."""
    for name in CONDITIONAL:
        hp = TINY[name].hparams
        plain = {k for k, _ in build_model(name, (1, 4, 4), **hp).named_parameters()}
        cond = {k for k, _ in build_model(name, (1, 4, 4), num_classes=K, **hp).named_parameters()}
        assert plain < cond and all("label" in k for k in cond - plain), name


# ----------------------------------------------------------------------------- scores and the detector


def test_scores_are_exact_on_a_tiny_model() -> None:
    """Marginal, label, disagreement and surprise scores against explicit per-class log_prob calls and
    each pixel's conditional read off the logits; the generative posterior they imply sums to one."""
    from ardetect.conditional import class_scores, conditional_scores

    model = conditional_model("pixelcnn", (1, 2, 3), 256)
    x = torch.randint(0, 256, (7, 1, 2, 3)).float()
    pred = np.array([0, 1, 2, 0, 1, 2, 2])
    per_class, surprise = class_scores(
        model, x, batch_size=4, surprise_pixels=2
    )  # (7, K) each, 1 image a chunk
    with torch.no_grad():
        explicit = torch.stack([model.log_prob(x, torch.full((7,), k)) for k in range(K)], 1).double()
        logits = model(x, torch.from_numpy(pred))  # (7, 256, 1, 2, 3)
    np.testing.assert_allclose(per_class, explicit.numpy(), atol=1e-4)
    bits = 6 * math.log(2)
    s = conditional_scores(per_class, pred, 6, surprise)
    pixel_bits = np.array(
        [
            [
                -math.log2(logits[i, :, 0, r, c].double().softmax(0)[int(x[i, 0, r, c])])
                for r in range(2)
                for c in range(3)
            ]
            for i in range(7)
        ]
    )  # (7, 6): each pixel's -log2 p(x_i | x_<i, ŷ)
    np.testing.assert_allclose(s["-surprise"], np.sort(pixel_bits, 1)[:, -2:].mean(1), rtol=1e-5)
    assert "-surprise" not in conditional_scores(per_class, pred, 6)
    marginal = -(np.log(np.exp(explicit.numpy()).sum(1) / K)) / bits
    np.testing.assert_allclose(s[""], marginal, rtol=1e-6)  # float32 passes, batched differently
    np.testing.assert_allclose(s["-pred"], -explicit.numpy()[np.arange(7), pred] / bits, rtol=1e-6)
    posterior = np.stack(
        [np.exp(-conditional_scores(per_class, np.full(7, k), 6)["-disagree"] * bits) for k in range(K)], 1
    )
    np.testing.assert_allclose(posterior.sum(1), 1.0, atol=1e-9)
    bayes = np.exp(explicit.numpy() - explicit.logsumexp(1, keepdim=True).numpy())  # p(x|y) / Σ p(x|y')
    np.testing.assert_allclose(posterior, bayes, atol=1e-5)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        conditional_scores(per_class, np.full(7, 3), 6)


def test_score_table_writes_the_four_conditional_scores() -> None:
    from ardetect.scoring import ImageSet, ScoreConfig, score_table

    model = conditional_model("pixelcnn", (1, 2, 3), 256)
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 2, 3), dtype=np.uint8)
    ids, labels = np.arange(5), np.array([0, 1, 2, 0, 1])
    sets = [ImageSet("test", images, ids, labels, labels)]
    table, speed = score_table({"c": (model, None)}, sets, ScoreConfig(batch_size=6), progress=False)
    expected = ["c", "c-pred", "c-disagree", "c-surprise"]
    assert list(dict.fromkeys(table["model"])) == expected and list(speed) == ["c"]
    with torch.no_grad():
        ll = model.log_prob(torch.from_numpy(images).float(), torch.from_numpy(labels)).double().numpy()
    np.testing.assert_allclose(
        table.loc[table["model"] == "c-pred", "bpd"], -ll / (6 * math.log(2)), rtol=1e-6
    )


def test_the_combined_detector_is_the_smaller_calibrated_pvalue() -> None:
    """-log10 min(p_surprise, p_disagree), each ranked against its own calib rows; the marginal BPD
    (model ``c`` itself) is not part of it."""
    import pandas as pd

    from ardetect.detection import pvalues, with_combined

    rng = np.random.default_rng(0)

    def rows(model: str, values: np.ndarray, source: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "image_id": np.arange(len(values)),
                "source": source,
                "attack": None,
                "epsilon": np.nan,
                "model": model,
                "bpd": values,
                "bpd_se": 0.0,
                "label": 0,
                "prediction": 0,
                "success": pd.array([pd.NA] * len(values), dtype="boolean"),
            }
        )

    source = np.array(["calib"] * 50 + ["test"] * 10)
    marg, sur, dis = rng.normal(size=60), rng.normal(size=60), rng.normal(size=60)
    named = {"c": marg, "c-disagree": dis, "c-surprise": sur, "u": marg}
    table = pd.concat([rows(model, values, source) for model, values in named.items()])
    out = with_combined(table)
    combined = out[out["model"] == "c-combined"]
    assert len(combined) == 60 and "u-combined" not in set(out["model"])
    expected = -np.log10(np.minimum(pvalues(sur, sur[:50]), pvalues(dis, dis[:50])))
    np.testing.assert_allclose(combined["bpd"], expected)
    shuffled = pd.concat([rows("c-surprise", sur, source), rows("c-disagree", dis, source).iloc[::-1]])
    with pytest.raises(ValueError, match="same images in the same order"):
        with_combined(shuffled)


def _train_steps(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    hp = {"pixelcnn": {"channels": 8, "blocks": 2, "head_channels": 8}}.get(name, TINY[name].hparams)
    model = build_model(name, (1, 28, 28), levels=256, num_classes=10, **hp)
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 256, (64, 1, 28, 28), generator=g).float()
        y = torch.randint(0, 10, (64,), generator=g)
        loss = model.training_nll(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", CONDITIONAL)
def test_conditional_training_is_bit_for_bit_reproducible(name: str) -> None:
    """Two seeded runs give identical weights on 2 threads (an indexed label lookup did not: its backward
    accumulates in a thread-dependent order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = _train_steps(name), _train_steps(name)
    finally:
        torch.set_num_threads(threads)
    assert [k for k in first if not torch.equal(first[k], second[k])] == []
