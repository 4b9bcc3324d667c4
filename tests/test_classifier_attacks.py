"""Classifier training and Foolbox attacks on sklearn's 8x8 digits (a few seconds on a CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from toys import digits_gray

from ardetect.attacks import (
    ATTACKS,
    AttackConfig,
    AttackResult,
    adversarial_figure,
    attack_summary,
    run_attacks,
    select_correct,
)
from ardetect.classifier import (
    ClassifierConfig,
    SmallCNN,
    accuracy,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)

EPSILONS = (0.1, 0.3)
TINY = ClassifierConfig(
    channels=(16, 32), hidden=32, dropout=0.0, epochs=10, batch_size=32, lr=5e-3, patience=5
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    gray, y = digits_gray()  # (1797, 1, 8, 8) uint8, (1797,)
    return {
        "x": gray[:1200],
        "y": y[:1200],
        "xv": gray[1200:1400],
        "yv": y[1200:1400],
        "xt": gray[1400:],
        "yt": y[1400:],
    }


@pytest.fixture(scope="module")
def classifier(digits: dict[str, np.ndarray]) -> SmallCNN:
    model, _ = train_classifier(digits["x"], digits["y"], digits["xv"], digits["yv"], TINY, progress=False)
    return model


@pytest.fixture(scope="module")
def attacked(
    classifier: SmallCNN, digits: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, list[AttackResult]]:
    idx = select_correct(classifier, digits["xt"], digits["yt"], 48)
    x, y = digits["xt"][idx], digits["yt"][idx]
    config = AttackConfig(
        epsilons=EPSILONS,
        deepfool_steps=20,
        cw_steps=50,
        cw_binary_search_steps=4,
        cw_initial_const=1.0,  # a margin of 5 logits needs a larger constant and step than the minimal
        cw_stepsize=0.05,  # attack; with the defaults 40% of cw_conf fail (all-zero sentinel)
        batch_size=32,
    )
    return x, y, run_attacks(classifier, x, y, config, progress=False)


def test_classifier_learns_digits(classifier: SmallCNN, digits: dict[str, np.ndarray]) -> None:
    assert accuracy(classifier, digits["xt"], digits["yt"]) > 0.9


def test_cnn_on_28x28_scores_each_image_on_its_own() -> None:
    """At the pipeline's size, in eval mode: an image's logits do not depend on the rest of its batch
    (no batch statistics or dropout at test time), and different images get different logits."""
    model = SmallCNN((1, 28, 28), ClassifierConfig()).eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        batch = model(x)  # (4, 10)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_predict_on_no_images() -> None:
    """An attack set whose every image failed is empty: predicting on it gives no labels, not an error."""
    model = SmallCNN((1, 28, 28), ClassifierConfig()).eval()
    labels = predict(model, np.zeros((0, 1, 28, 28), np.uint8))
    assert labels.shape == (0,) and labels.dtype == np.int64
    assert accuracy(model, np.zeros((3, 1, 28, 28), np.uint8), np.zeros(3, np.int64)) in (0.0, 1.0)


def test_early_stopping_keeps_best_epoch(digits: dict[str, np.ndarray]) -> None:
    """With a learning rate too small to move the weights, val accuracy never improves after epoch 1."""
    seen: list[dict[str, float]] = []
    config = ClassifierConfig(channels=(4, 4), hidden=8, epochs=10, patience=2, lr=1e-12)
    _, history = train_classifier(
        digits["x"][:200],
        digits["y"][:200],
        digits["xv"],
        digits["yv"],
        config,
        on_epoch=seen.append,
        progress=False,
    )
    assert len(history) == 3
    assert seen == history


def test_save_load_roundtrip(classifier: SmallCNN, tmp_path, digits: dict[str, np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "clf.pt"
    save_classifier(classifier, path)
    loaded = load_classifier(path)
    assert loaded.config == classifier.config
    assert np.array_equal(predict(loaded, digits["xt"]), predict(classifier, digits["xt"]))
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), classifier.eval()(x))


def test_classifier_rejects_bad_images(classifier: SmallCNN) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predict(classifier, np.full((2, 1, 8, 8), 2.0, dtype=np.float32))
    with pytest.raises(TypeError, match="uint8"):
        predict(classifier, np.zeros((2, 1, 8, 8), dtype=np.int16))


def test_select_correct(classifier: SmallCNN, digits: dict[str, np.ndarray]) -> None:
    x, y = digits["xt"], digits["yt"]
    idx = select_correct(classifier, x, y, 20)
    right = np.flatnonzero(predict(classifier, x) == y)
    assert np.array_equal(idx, right[:20])
    with pytest.raises(ValueError, match=r"num_attack_images=5000 exceeds the 397 test images"):
        select_correct(classifier, x, y, 5000, param="num_attack_images")
    wrong = (y + 1) % 10  # every label wrong, so nothing is classified correctly
    with pytest.raises(ValueError, match=r"only \d+ of 397 .* fewer than num_images=10"):
        select_correct(classifier, x, wrong, 10)


def test_unknown_attack_and_bad_epsilon_rejected() -> None:
    with pytest.raises(ValueError, match=r"bogus.*valid attacks: fgsm, pgd, noise, deepfool, cw"):
        AttackConfig(attacks=("fgsm", "bogus"))
    for eps in (0.0, 1.5):
        with pytest.raises(ValueError, match="epsilons"):
            AttackConfig(epsilons=(eps,))


def test_one_result_per_attack_and_epsilon(
    attacked: tuple[np.ndarray, np.ndarray, list[AttackResult]],
) -> None:
    _, _, results = attacked
    keys = [(r.attack, r.epsilon) for r in results]
    assert keys == [
        ("fgsm", 0.1),
        ("fgsm", 0.3),
        ("pgd", 0.1),
        ("pgd", 0.3),
        ("deepfool", None),
        ("cw", None),
        ("cw_conf", None),
        ("noise", 0.1),
        ("noise", 0.3),
    ]  # the order of AttackConfig.attacks (params.yaml's)
    assert {r.attack for r in results} == set(ATTACKS)


def test_linf_attacks_stay_within_epsilon(
    attacked: tuple[np.ndarray, np.ndarray, list[AttackResult]],
) -> None:
    x, _, results = attacked
    clean = x.astype(np.float64) / 255.0
    for r in results:
        if r.epsilon is None:
            continue
        raw = np.abs(r.before_rounding.astype(np.float64) - clean).max()
        rounded = np.abs(r.adversarial.astype(np.float64) / 255.0 - clean).max()
        assert raw <= r.epsilon + 1e-6, r.name
        assert rounded <= r.epsilon + 0.5 / 255 + 1e-6, r.name
        assert r.linf.max() <= r.epsilon + 0.5 / 255 + 1e-6


def test_adversarials_are_valid_images(attacked: tuple[np.ndarray, np.ndarray, list[AttackResult]]) -> None:
    x, _, results = attacked
    for r in results:
        assert r.adversarial.dtype == np.uint8 and r.adversarial.shape == x.shape
        assert r.before_rounding.min() >= 0 and r.before_rounding.max() <= 1
        assert np.array_equal(r.adversarial, np.rint(r.before_rounding * 255).astype(np.uint8))
        delta = r.adversarial.astype(np.float64) / 255 - x / 255.0
        np.testing.assert_allclose(r.l2, np.sqrt((delta.reshape(len(x), -1) ** 2).sum(1)), atol=1e-6)


def test_success_after_rounding_is_rechecked(
    classifier: SmallCNN, attacked: tuple[np.ndarray, np.ndarray, list[AttackResult]]
) -> None:
    _, y, results = attacked
    for r in results:
        pred = predict(classifier, r.adversarial)
        assert np.array_equal(r.prediction, pred)
        assert np.array_equal(r.success, r.success_before_rounding & (pred != y)), r.name
        assert not (r.success & r.failed).any(), r.name
        black = (r.adversarial.reshape(len(y), -1) == 0).all(1)
        assert not (r.success & black).any(), f"{r.name}: a black square counted as a success"


def test_attacks_lower_accuracy(attacked: tuple[np.ndarray, np.ndarray, list[AttackResult]]) -> None:
    """All images start correctly classified; every optimised attack must fool the classifier often."""
    _, _, results = attacked
    by_key = {(r.attack, r.epsilon): r for r in results}
    for attack in ("fgsm", "pgd"):
        assert by_key[(attack, 0.1)].success.mean() > 0.1, attack
    strong: list[tuple[str, float | None]] = [
        ("fgsm", 0.3),
        ("pgd", 0.3),
        ("deepfool", None),
        ("cw", None),
        ("cw_conf", None),
    ]
    for key in strong:
        r = by_key[key]
        assert r.success_before_rounding.mean() > 0.8, key
        assert r.success.mean() > 0.5, key  # rounding may undo some boundary-hugging examples
    assert by_key[("pgd", 0.3)].success.mean() >= by_key[("pgd", 0.1)].success.mean()
    # a logit margin buys robustness to 8-bit rounding, paid for with a larger perturbation
    cw, cw_conf = by_key[("cw", None)], by_key[("cw_conf", None)]
    assert cw_conf.success.mean() >= cw.success.mean()
    assert cw_conf.l2_before_rounding.mean() > cw.l2_before_rounding.mean()
    assert by_key[("pgd", 0.1)].success.mean() >= by_key[("fgsm", 0.1)].success.mean() - 0.05


def test_no_rounding_keeps_floats(classifier: SmallCNN, digits: dict[str, np.ndarray]) -> None:
    idx = select_correct(classifier, digits["xt"], digits["yt"], 16)
    x, y = digits["xt"][idx], digits["yt"][idx]
    (r,) = run_attacks(
        classifier,
        x,
        y,
        AttackConfig(attacks=("fgsm",), epsilons=(0.2,), round_to_8bit=False),
        progress=False,
    )
    assert r.adversarial.dtype == np.float32
    assert np.array_equal(r.adversarial, r.before_rounding)
    assert np.array_equal(r.success, r.success_before_rounding & (predict(classifier, r.adversarial) != y))


def test_summary_and_figure(attacked: tuple[np.ndarray, np.ndarray, list[AttackResult]]) -> None:
    x, y, results = attacked
    summary = attack_summary(results)
    assert len(summary) == len(results)
    np.testing.assert_allclose(summary["success_after_rounding"], [r.success.mean() for r in results])
    assert summary.loc[summary["attack"] == "cw", "epsilon"].isna().all()
    fig = adversarial_figure(x, y, results, n=4)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4 * (1 + len(results))


class Brightness(torch.nn.Module):
    """Class 0 for bright images (mean > 0.1), class 1 for dark ones: black is "class 1"."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(100.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1, keepdim=True)  # (B, 1)
        return torch.cat([self.gain * (m - 0.1), torch.zeros_like(m)], 1)  # (B, 2)


def test_failed_carlini_wagner_is_not_a_success() -> None:
    """Foolbox's CW returns an all-zero image where it fails, and its own success flag only asks whether
    the classifier mislabels that black square; here it does, so Foolbox reports a success. The attack
    must report a failure, and the summary must not count it (nor its norm)."""
    import foolbox as fb

    x = np.full((3, 1, 8, 8), 128, np.uint8)  # mean 0.5: class 0; far from the boundary in L2
    y = np.zeros(3, np.int64)
    model = Brightness().eval()
    cw = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=1, steps=2, stepsize=1e-4, initial_const=1e-6)
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    _, raw, fb_success = cw(fmodel, torch.as_tensor(x).float() / 255, torch.as_tensor(y), epsilons=None)
    assert (raw == 0).all() and fb_success.all(), "the Foolbox behaviour this guards against"
    config = AttackConfig(
        attacks=("cw",), cw_steps=2, cw_binary_search_steps=1, cw_stepsize=1e-4, cw_initial_const=1e-6
    )
    (r,) = run_attacks(model, x, y, config, progress=False)
    assert r.failed.all() and not r.success.any() and not r.success_before_rounding.any()
    summary = attack_summary([r])
    assert summary.loc[0, "success_after_rounding"] == 0 and summary.loc[0, "failed"] == 3
    assert np.isnan(summary.loc[0, "mean_l2"])
    fig = adversarial_figure(x, y, [r], n=3)
    failed_row = fig.axes[3:]  # no black square drawn as if it were the attack's output
    assert [ax.get_title() for ax in failed_row] == ["failed"] * 3
    assert all(np.array_equal(ax.get_images()[0].get_array(), x[j, 0]) for j, ax in enumerate(failed_row))


def test_failure_sentinel_only_flags_unreachable_black() -> None:
    from ardetect.attacks import failure_sentinel

    clean = np.stack([np.full((1, 2, 2), 0.5), np.full((1, 2, 2), 0.02), np.zeros((1, 2, 2))])  # (3, 1, 2, 2)
    black = np.zeros_like(clean)
    np.testing.assert_array_equal(failure_sentinel(clean, black, None), [True, True, False])
    np.testing.assert_array_equal(failure_sentinel(clean, black, 8 / 255), [True, False, False])
    np.testing.assert_array_equal(failure_sentinel(clean, clean, None), [False, False, False])


def test_the_channels_last_classifier_is_the_nchw_function() -> None:
    """Channels-last is a layout, not new values: the same logits and gradients as the same weights in
    NCHW, and an NCHW state_dict (older checkpoints) loads as is."""
    torch.manual_seed(0)
    model = SmallCNN((1, 28, 28), TINY).eval()
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(5, 1, 28, 28, requires_grad=True)
    out = model(x)
    (grad,) = torch.autograd.grad(out.sum(), x)

    def nchw_block(h: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
        weight = conv.weight.clone(memory_format=torch.contiguous_format)
        return F.max_pool2d(torch.relu(F.conv2d(h, weight, conv.bias, padding=1)), 2)

    ref_x = x.detach().clone().requires_grad_(True)  # NCHW input, NCHW weights, NCHW activations
    h = nchw_block(nchw_block(ref_x, model.features[0]), model.features[3])
    assert h.is_contiguous()
    ref = model.head(h)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
    fresh = SmallCNN((1, 28, 28), TINY).eval()
    fresh.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    torch.testing.assert_close(fresh(x), out)
