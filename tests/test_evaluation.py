"""The evaluation's honesty: paired intervals that cover, thresholds calibrated off the evaluated images,
attack sets in numeric order, small cells flagged, and an adaptive attacker that sees the detector."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

from ardetect.adaptive import (
    AdaptiveConfig,
    Detector,
    DetectorAware,
    relaxed_bpd,
    run_adaptive,
    strength_sweep,
)
from ardetect.attacksets import AttackSet, format_epsilon, sorted_sets
from ardetect.classifier import ClassifierConfig, SmallCNN
from ardetect.detection import (
    COLUMNS,
    MIN_CELL,
    attack_outcomes,
    bootstrap_auroc_ci,
    detection_table,
    realized_fpr,
    threshold_at_fpr,
)
from ardetect.models import build_model
from ardetect.report import auroc_matrix
from ardetect.scoring import clean_test_pools


def test_attack_set_names_and_numeric_order() -> None:
    pgd8, pgd25 = AttackSet("pgd", 8 / 255), AttackSet("pgd", 25 / 255)
    assert (pgd8.slug, pgd8.label) == ("pgd_e8", "pgd ε=8/255")
    assert AttackSet("pgd", 0.3).slug == "pgd_e0.3" and AttackSet("cw").slug == "cw"
    assert AttackSet.of("cw", np.nan) == AttackSet("cw") and AttackSet.of("cw", np.nan).epsilon is None
    assert math.isnan(AttackSet("cw").epsilon_or_nan) and format_epsilon(None) == "—"
    assert AttackSet("adaptive_pgd", 8 / 255).oblivious == pgd8
    for s in (pgd8, pgd25, AttackSet("cw_conf"), AttackSet("adaptive_pgd", 25 / 255), AttackSet("pgd", 0.3)):
        assert AttackSet.from_slug(s.slug) == s
    shuffled = [AttackSet("adaptive_cw"), pgd25, AttackSet("cw"), pgd8, AttackSet("noise", 51 / 255), pgd8]
    order = [s.slug for s in sorted_sets(shuffled)]
    assert order == ["noise_e51", "pgd_e8", "pgd_e25", "cw", "adaptive_cw"]  # 8/255 before 25/255


def _paired_sample(rng: np.random.Generator, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Each image has its own level z (shared by the pair), as an image and its adversarial do."""
    z = rng.normal(0, 1, n)
    return z + rng.normal(0, 0.3, n), z + shift + rng.normal(0, 0.3, n)


def test_paired_bootstrap_covers_the_true_auroc() -> None:
    """Correlated pairs (r = 1 / 1.09 ≈ 0.92, as an image's BPD before and after a small attack): the
    population AUROC compares independent draws of the two marginals, N(0, 1.09) and N(shift, 1.09):
    Φ(shift / sqrt(2.18)). The paired 95% interval must cover it in 90-99% of repetitions; resampling the
    groups independently ignores the pairing and is more than twice as wide."""
    shift, n, reps = 0.5, 60, 200
    truth = norm.cdf(shift / math.sqrt(2 * 1.09))
    rng = np.random.default_rng(0)
    covered, widths_paired, widths_unpaired = 0, [], []
    for rep in range(reps):
        neg, pos = _paired_sample(rng, n, shift)
        low, high = bootstrap_auroc_ci(neg, pos, n_boot=400, seed=rep)
        covered += low <= truth <= high
        widths_paired.append(high - low)
        if rep < 20:
            lo_u, hi_u = bootstrap_auroc_ci(neg, pos, n_boot=400, seed=rep, paired=False)
            widths_unpaired.append(hi_u - lo_u)
    assert 0.90 <= covered / reps <= 0.99, covered / reps
    assert np.mean(widths_unpaired) > 2 * np.mean(widths_paired[:20])


def test_paired_bootstrap_needs_pairs() -> None:
    neg = np.arange(50, dtype=float)
    with pytest.raises(ValueError, match="paired scores need equal lengths"):
        bootstrap_auroc_ci(neg, neg[:-1] + 1)
    assert bootstrap_auroc_ci(neg[:10], neg[:9] + 1, n_boot=50, paired=False)[0] <= 1


def test_clean_pools_are_disjoint_and_calibration_is_off_the_evaluated_images() -> None:
    correct = np.ones(100, bool)
    correct[[60, 61, 62]] = False
    attacked = np.array([3, 40, 41])
    test, calib = clean_test_pools(correct, attacked, num_test=10, num_calib=20, seed=0)
    assert set(test) == set(range(10)) | {40, 41}
    assert len(calib) == 20 and not set(calib) & set(test) and not set(calib) & {60, 61, 62}
    again = clean_test_pools(correct, attacked, num_test=10, num_calib=20, seed=0)
    assert np.array_equal(again[1], calib)
    with pytest.raises(ValueError, match=r"score.num_calib = 90 exceeds the 85"):
        clean_test_pools(correct, attacked, num_test=10, num_calib=90, seed=0)


def _table(models: dict[str, float], n_pos: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """Score rows: clean calib/test/train_ref at N(1, 0.2) (calib shifted by ``models[m]``), fgsm and cw
    adversarials at +0.5 for the first ``n_pos[set]`` images."""
    rng = np.random.default_rng(seed)
    rows = []

    def add(**kw: object) -> None:
        rows.append({"bpd_se": 0.0, "label": 0, "prediction": 0, "attack": None, "epsilon": np.nan, **kw})

    for model, calib_shift in models.items():
        for i in range(400):
            add(image_id=i, source="train_ref", model=model, bpd=rng.normal(1, 0.2), success=np.nan)
            add(
                image_id=1000 + i,
                source="calib",
                model=model,
                bpd=rng.normal(1 + calib_shift, 0.2),
                success=np.nan,
            )
        clean = rng.normal(1, 0.2, 400)
        for i in range(400):
            add(image_id=i, source="test", model=model, bpd=clean[i], success=np.nan)
        for attack, eps in (("fgsm", 8 / 255), ("fgsm", 25 / 255), ("cw", np.nan)):
            slug = AttackSet.of(attack, eps).slug
            for i in range(100):
                ok = i < n_pos[slug]
                add(
                    image_id=i,
                    source="adversarial",
                    model=model,
                    attack=attack,
                    epsilon=eps,
                    bpd=clean[i] + 0.5,
                    prediction=1 if ok else 0,
                    success=ok,
                )
    return pd.DataFrame(rows)[list(COLUMNS)]


def test_realized_fpr_is_reported_and_matches_the_target_when_calibrated_in_distribution() -> None:
    """Calibrating on images from the test distribution realizes the target FPR on held-out clean images;
    calibrating on a shifted pool (as the old validation split from the training pool was) does not,
    and the ``fpr`` column says so."""
    scores = _table({"same": 0.0, "shifted": -0.1}, {"fgsm_e8": 100, "fgsm_e25": 100, "cw": 100})
    fpr = realized_fpr(scores, 0.05).set_index("model")["fpr"]
    assert fpr["same"] == pytest.approx(0.05, abs=0.03)
    assert fpr["shifted"] > 0.12
    table = detection_table(scores, n_boot=50).set_index(["model", "set"])
    row = table.loc[("same", "fgsm_e8")]
    test = scores[(scores["model"] == "same") & (scores["source"] == "test")].set_index("image_id")["bpd"]
    assert row["fpr"] == pytest.approx((test.loc[:99] > row["threshold"]).mean())
    calib = scores[(scores["model"] == "same") & (scores["source"] == "calib")]["bpd"]
    assert row["threshold"] == threshold_at_fpr(calib, 0.05)


def test_small_cells_are_flagged_and_sets_sorted_in_the_matrix() -> None:
    scores = _table({"m": 0.0}, {"fgsm_e8": 100, "fgsm_e25": MIN_CELL - 1, "cw": MIN_CELL})
    table = detection_table(scores, n_boot=50)
    assert list(table["set"]) == ["fgsm_e8", "fgsm_e25", "cw"]
    assert list(table["small"]) == [False, True, False]
    matrix = auroc_matrix(table)
    assert list(matrix.columns) == ["model", "fgsm ε=8/255", "fgsm ε=25/255", "cw"]
    cells = matrix.iloc[0]
    assert cells["fgsm ε=25/255"].startswith("(") and cells["fgsm ε=25/255"].endswith("†")
    assert not cells["cw"].endswith("†") and not cells["fgsm ε=8/255"].endswith("†")


def test_attack_outcomes_count_evasion_against_the_calibrated_threshold() -> None:
    scores = _table({"m": 0.0}, {"fgsm_e8": 60, "fgsm_e25": 100, "cw": 0})
    out = attack_outcomes(scores, "m", [AttackSet("fgsm", 8 / 255), AttackSet("cw")], np.arange(50), 0.05)
    fgsm = out.set_index("set").loc["fgsm_e8"]
    adv = scores[
        (scores["source"] == "adversarial") & (scores["attack"] == "fgsm") & (scores["image_id"] < 50)
    ]
    adv = adv[np.isclose(adv["epsilon"], 8 / 255)]
    evaded = adv["bpd"] <= fgsm["threshold"]
    assert fgsm["n"] == 50 and fgsm["classifier_success"] == 1.0
    assert fgsm["evasion_rate"] == pytest.approx(evaded.mean())
    assert fgsm["joint_success"] == pytest.approx(evaded.mean())
    cw = out.set_index("set").loc["cw"]
    assert cw["classifier_success"] == 0 and cw["joint_success"] == 0 and math.isnan(cw["auroc"])


@pytest.fixture(scope="module")
def tiny() -> tuple[SmallCNN, torch.nn.Module, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    density = build_model("pixelcnn", (1, 8, 8), 256, channels=8, blocks=1, head_channels=8).eval()
    clf = SmallCNN((1, 8, 8), ClassifierConfig(channels=(4, 8), hidden=8)).eval()
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8).numpy()
    with torch.no_grad():
        y = clf(torch.as_tensor(x).float() / 255).argmax(1).numpy()
    return clf, density, x, y


def test_relaxed_bpd_is_exact_on_8bit_images_and_sees_each_pixels_own_level(tiny) -> None:  # type: ignore[no-untyped-def]
    _, density, x, _ = tiny
    levels = torch.as_tensor(x).float()
    exact = density.bpd(levels)
    for relax in (True, False):
        torch.testing.assert_close(relaxed_bpd(density, levels / 255, relax), exact, rtol=1e-5, atol=1e-5)
    # The last pixel conditions nothing, so only its own likelihood moves with it: the straight-through
    # gradient misses that (zero), the relaxed one sees it, and equals the slope between its two levels.
    grads = {}
    for relax in (True, False):
        u = (levels / 255).clone().requires_grad_(True)
        relaxed_bpd(density, u, relax).sum().backward()
        grads[relax] = u.grad[:, 0, -1, -1]  # type: ignore[index]
    assert torch.all(grads[False] == 0) and torch.all(grads[True] != 0)
    logp = torch.log_softmax(density(levels), 1)[:, :, 0, -1, -1]  # (B, 256)
    lo = levels[:, 0, -1, -1].clamp(max=254).long()
    slope = -(logp.gather(1, lo[:, None] + 1) - logp.gather(1, lo[:, None]))[:, 0] * 255 / (64 * math.log(2))
    torch.testing.assert_close(grads[True], slope, rtol=1e-4, atol=1e-4)


def test_detected_logit_wins_exactly_above_the_threshold(tiny) -> None:  # type: ignore[no-untyped-def]
    clf, density, x, _ = tiny
    u = torch.as_tensor(x).float() / 255
    bpd = density.bpd(torch.as_tensor(x).float()).detach()
    for tau, flagged in ((bpd - 0.01, True), (bpd + 0.01, False)):
        for i in range(len(x)):
            wrapped = DetectorAware(clf, Detector(density, (float(tau[i]),)), scale=10.0)
            logits = wrapped(u[i : i + 1]).detach()
            assert (logits.argmax(1).item() == logits.shape[1] - 1) == flagged


def test_adaptive_attack_drives_bpd_down_only_with_the_relaxed_gradient(tiny) -> None:  # type: ignore[no-untyped-def]
    clf, density, x, y = tiny
    config = AdaptiveConfig(scales=(10.0,), sweep_steps=8, pgd_rel_stepsize=0.1)
    tau = float(density.bpd(torch.as_tensor(x).float()).detach().mean()) - 0.5  # under the clean BPD
    runs = strength_sweep(clf, Detector(density, (tau,)), x, y, 8 / 255, config, progress=False)
    relaxed, straight = runs
    assert relaxed.relax and not straight.relax and len(relaxed.bpd_per_step) == 8 + 1
    assert relaxed.bpd_per_step[-1] < relaxed.bpd_per_step[0] - 0.01
    assert relaxed.bpd_per_step[-1] < straight.bpd_per_step[-1]
    r = relaxed.result
    assert r.adversarial.dtype == np.uint8 and np.abs(r.adversarial.astype(int) - x).max() <= 8
    torch.testing.assert_close(
        torch.as_tensor(r.bpd), density.bpd(torch.as_tensor(r.adversarial).float()).double().detach()
    )
    assert np.array_equal(r.joint, r.success & r.evaded) and np.array_equal(r.evaded, r.bpd <= tau)


def test_adaptive_cw_runs_and_judges_after_rounding(tiny) -> None:  # type: ignore[no-untyped-def]
    clf, density, x, y = tiny
    config = AdaptiveConfig(cw_steps=5, cw_binary_search_steps=2)
    r = run_adaptive(
        clf, Detector(density, (9.0,)), x, y, AttackSet("adaptive_cw"), 10.0, config, progress=False
    )
    with torch.no_grad():
        pred = clf(torch.as_tensor(r.adversarial).float() / 255).argmax(1).numpy()
    assert np.array_equal(r.prediction, pred)
    assert np.array_equal(r.success, (pred != y) & ~r.failed)
    assert r.summary()["n"] == len(x)
    assert all(p.requires_grad for p in (*clf.parameters(), *density.parameters())), "frozen only meanwhile"


def test_union_thresholds_flag_exactly_what_the_combined_score_flags() -> None:
    """Per-score thresholds reproduce -log10 min(p_1, p_2) > τ_c (τ_c set at the FPR on calib) on calib
    and on new images, ties included."""
    from ardetect.detection import pvalues, union_thresholds

    rng = np.random.default_rng(1)
    calib = np.stack([rng.normal(size=400), rng.integers(0, 30, 400).astype(float)], 1)  # ties in column 2
    tau = union_thresholds(calib, 0.05)
    new = np.stack([rng.normal(size=300) * 1.5, rng.integers(0, 40, 300).astype(float)], 1)
    for x in (calib, new):
        combined = -np.log10(np.minimum(pvalues(x[:, 0], calib[:, 0]), pvalues(x[:, 1], calib[:, 1])))
        c_calib = -np.log10(np.minimum(pvalues(calib[:, 0], calib[:, 0]), pvalues(calib[:, 1], calib[:, 1])))
        expected = combined > threshold_at_fpr(c_calib, 0.05)
        assert np.array_equal((x > np.asarray(tau)).any(1), expected)
    assert (calib > np.asarray(tau)).any(1).mean() <= 0.05


@pytest.fixture(scope="module")
def tiny_conditional(tiny):  # type: ignore[no-untyped-def]
    clf, _, x, y = tiny
    torch.manual_seed(1)
    density = build_model("pixelcnn", (1, 8, 8), 256, channels=8, blocks=1, head_channels=8, num_classes=10)
    with torch.no_grad():
        for name, p in density.named_parameters():
            if "label" in name:
                p.normal_(0, 0.5)  # distinct classes
    return clf, density.eval(), x, y


def test_conditional_detector_scores_are_exact_on_8bit_images(tiny_conditional) -> None:  # type: ignore[no-untyped-def]
    """The relaxed (differentiable) surprise and disagreement equal the score table's exact ones on
    8-bit images, with the classifier's label; the attacker gets a gradient of the surprise."""
    from ardetect.conditional import class_scores, conditional_scores

    clf, density, x, _ = tiny_conditional
    levels = torch.as_tensor(x).float()
    detector = Detector(density, (0.0, 0.0), surprise_pixels=5)
    with torch.no_grad():
        z = clf(levels / 255)
        relaxed = detector.relaxed(levels / 255, z).double().numpy()
    pred = z.argmax(1).numpy()
    per_class, surprise = class_scores(density, levels, 64, surprise_pixels=5)
    table = conditional_scores(per_class, pred, density.num_dims, surprise)
    np.testing.assert_allclose(relaxed[:, 0], table["-surprise"], rtol=1e-5)
    np.testing.assert_allclose(relaxed[:, 1], table["-disagree"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(detector.exact(levels, pred), relaxed, rtol=1e-4, atol=1e-6)
    unit = (levels / 255 + 0.3 / 255).requires_grad_()  # between levels: the relaxation's gradient
    detector.relaxed(unit, z)[:, 0].sum().backward()
    assert unit.grad is not None and (unit.grad.flatten(1).abs() > 0).sum(1).min() >= 5


def test_attack_on_the_conditional_detector_judges_both_scores(tiny_conditional) -> None:  # type: ignore[no-untyped-def]
    clf, density, x, y = tiny_conditional
    levels = torch.as_tensor(x).float()
    with torch.no_grad():
        clean = Detector(density, (0.0, 0.0)).exact(levels, clf(levels / 255).argmax(1).numpy())
    detector = Detector(density, (float(clean[:, 0].mean()), float(np.median(clean[:, 1]))))
    config = AdaptiveConfig(pgd_steps=4)
    r = run_adaptive(
        clf, detector, x[:6], y[:6], AttackSet("adaptive_cond_pgd", 8 / 255), 10.0, config, progress=False
    )
    with torch.no_grad():
        adv = torch.as_tensor(r.adversarial).float()
        scores = Detector(density, ()).exact(adv, clf(adv / 255).argmax(1).numpy())
    assert np.array_equal(r.evaded, ~(scores > np.asarray(detector.thresholds)).any(1))
    np.testing.assert_allclose(r.bpd, scores[:, 0])
    assert r.summary()["mean_surprise"] == pytest.approx(scores[:, 0].mean())
    assert np.abs(r.adversarial.astype(int) - x[:6]).max() <= 8
