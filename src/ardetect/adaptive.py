"""Adaptive attacks: Foolbox against the classifier and the BPD detector together.

Carlini & Wagner (2017)'s K+1 construction: one module returns the classifier's K logits plus a
"detected" logit ``max_k z_k(x) + scale * (BPD(x) - τ)``, which is the largest exactly when
``BPD(x) > τ``, the detector's threshold at its target false-positive rate. A *targeted* attack (toward
the classifier's runner-up class, so "detected" never counts as a success) then succeeds only by fooling
the classifier while staying under the threshold. Foolbox's own PGD (L∞) and Carlini-Wagner (L2) run
on it unchanged.

Gradients through the density model (BPDA, Athalye et al. 2018): the model reads 8-bit levels, so its
input is rounded with a straight-through gradient. That alone leaves each pixel's own target level
fixed, and the attack could not see how changing a pixel moves that pixel's own likelihood; with
``relax`` the pixel's log-probability is interpolated linearly between its two adjacent levels, which is
exact on the 256 levels and differentiable in between. Adversarials are stored rounded to 8 bits and
judged after rounding, with the exact BPD.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import foolbox as fb
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor, nn
from tqdm.auto import tqdm

from ardetect.attacks import (
    AttackParams,
    Epsilon,
    adversarial_figure,
    failure_sentinel,
    perturbation_norms,
    select_correct,
)
from ardetect.attacksets import AttackSet, save_attack_set
from ardetect.classifier import predict, seeded
from ardetect.conditional import SURPRISE_PIXELS, class_scores, conditional_scores, top_surprise
from ardetect.configs import Device, config_dataclass
from ardetect.detection import COMBINED, threshold_at_fpr, union_thresholds
from ardetect.models.base import ARModel
from ardetect.report import save_figure
from ardetect.scoring import ScoreParams, clean_test_pools, score_bpd

if TYPE_CHECKING:  # types only: the adaptive stage's closure stays free of the training loop
    from ardetect.training import ModelEntry, TrainSection

ADAPTIVE_ATTACKS = ("adaptive_pgd", "adaptive_cw")


@config_dataclass
class AdaptiveConfig:
    """The detector-aware attacks; ``scale`` multiplies BPD (bits/dim) in the detected logit."""

    epsilons: tuple[Epsilon, ...] = (8 / 255, 25 / 255)
    pgd_steps: PositiveInt = 50
    pgd_rel_stepsize: PositiveFloat = 0.05
    pgd_random_start: bool = False  # start at the clean image, under τ (stronger here than a random start)
    cw_steps: PositiveInt = 50
    cw_binary_search_steps: PositiveInt = 2
    cw_confidence: NonNegativeFloat = 0.0
    cw_stepsize: PositiveFloat = 0.02
    cw_initial_const: PositiveFloat = 1.0
    scales: tuple[PositiveFloat, ...] = (1.0, 10.0, 100.0)
    relax: bool = True
    sweep_images: PositiveInt = 32
    sweep_steps: PositiveInt = 60
    batch_size: PositiveInt = 100
    seed: NonNegativeInt = 0


@config_dataclass
class AdaptiveParams(AdaptiveConfig):
    """``adaptive`` in params.yaml."""

    model: str = "pixelcnn_8bit"  # the 8-bit density model whose detector is attacked (one of train.models)
    num_images: PositiveInt = 100  # the first N originals of the oblivious attacks (paired with them)
    # a class-conditional 8-bit model whose combined detector (surprise or disagreement) is attacked
    # too, on the first conditional_images originals (K passes per step: 10x the cost per image)
    conditional_model: str | None = "pixelcnn_8bit_cond"
    conditional_images: PositiveInt = 12
    conditional_steps: PositiveInt = 20  # PGD steps, and CW steps per binary-search step
    device: Device = "auto"
    progress: bool = True


def adaptive_problems(
    adaptive: AdaptiveParams, train: TrainSection, models: dict[str, ModelEntry], attack: AttackParams
) -> list[str]:
    """The adaptive attack needs a trained 8-bit model and at most the oblivious attacks' originals."""
    problems = []
    target = adaptive.model
    if target not in train.models or target not in models:
        problems.append(
            f"adaptive.model = {target!r}: not a trained model (train.models: {', '.join(train.models)})"
        )
    elif models[target].is_background:
        problems.append(
            f"adaptive.model = {target!r}: a background model (mutation_rate > 0) is no detector; "
            "attack the model it is the background of"
        )
    elif models[target].levels != 256:
        problems.append(
            f"adaptive.model = {target!r}: the adaptive attack needs an 8-bit model (levels: 256)"
        )
    cond = adaptive.conditional_model
    if cond is not None and not (cond in train.models and cond in models and models[cond].conditional):
        conditional = [m for m in train.models if m in models and models[m].conditional]
        problems.append(
            f"adaptive.conditional_model = {cond!r}: not a trained class-conditional model "
            f"(trained conditional models: {', '.join(conditional) or 'none'}; or null)"
        )
    if adaptive.conditional_images > adaptive.num_images:
        problems.append(
            f"adaptive.conditional_images = {adaptive.conditional_images}: at most adaptive.num_images"
        )
    if adaptive.num_images > attack.num_images:
        problems.append(
            f"adaptive.num_images = {adaptive.num_images}: at most attack.num_images = "
            f"{attack.num_images} (the adaptive sets reuse the oblivious attacks' originals)"
        )
    return problems


def relaxed_bpd(density: ARModel, x: Tensor, relax: bool = True) -> Tensor:
    """BPD of gray images ``x`` in [0, 1] (B, C, H, W) under an 8-bit model, differentiable in ``x``.

    The model reads ``round(255 x)`` with a straight-through gradient; each pixel's log-probability is
    the model's at its level (``relax=False``) or interpolated between the two levels around ``255 x``
    (``relax=True``). Both equal the exact BPD on 8-bit images.
    """
    return -relaxed_log_prob(density, x, None, relax) / (density.num_dims * math.log(2.0))  # (B,)


def relaxed_log_prob(density: ARModel, x: Tensor, y: Tensor | None = None, relax: bool = True) -> Tensor:
    """log p(x) (or log p(x | y) for a class-conditional model) in nats, relaxed as in :func:`relaxed_bpd`."""
    return relaxed_pixel_log_prob(density, x, y, relax).flatten(1).sum(1)  # (B,)


def relaxed_pixel_log_prob(
    density: ARModel, x: Tensor, y: Tensor | None = None, relax: bool = True
) -> Tensor:
    """Each position's log p(x_i | x_<i) (given ``y`` for a class-conditional model) in nats,
    (B, C, H, W), relaxed as in :func:`relaxed_bpd`."""
    if density.levels != 256:
        raise ValueError(
            f"the adaptive attack needs an 8-bit density model (levels=256), got {density.levels}"
        )
    v = x * 255.0  # (B, C, H, W) continuous levels
    v_in = v + (v.round() - v).detach()  # straight-through rounding
    logp = F.log_softmax(density.logits_for(v_in, y).float(), dim=1)  # (B, 256, C, H, W)
    if relax:
        lo = v.detach().floor().clamp(0, 254)  # (B, C, H, W)
        t = v - lo  # (B, C, H, W) in [0, 1], carries the gradient
        lp_lo = logp.gather(1, lo.long().unsqueeze(1)).squeeze(1)  # (B, C, H, W)
        lp_hi = logp.gather(1, (lo + 1).long().unsqueeze(1)).squeeze(1)
        lp = (1 - t) * lp_lo + t * lp_hi
    else:
        lp = logp.gather(1, v.detach().round().long().unsqueeze(1)).squeeze(1)
    return lp  # (B, C, H, W)


@dataclasses.dataclass(frozen=True)
class Detector:
    """The defence the attacker evades: an image is flagged when any of its scores exceeds its threshold.

    An unconditional 8-bit model: one score, BPD. A class-conditional one (``ardetect.conditional``): the
    surprise under the classifier's label (``surprise_pixels``) and the generative disagreement with
    it, each with the threshold at which the union (the score table's ``-combined`` detector, the
    smaller of two calibrated p-values) flags ``fpr`` of the clean calibration images.
    """

    density: ARModel
    thresholds: tuple[float, ...]
    surprise_pixels: int = SURPRISE_PIXELS

    @property
    def conditional(self) -> bool:
        return bool(self.density.num_classes)

    def relaxed(self, x: Tensor, z: Tensor, relax: bool = True) -> Tensor:
        """The scores of gray images ``x`` in [0, 1], differentiable in ``x`` (B, J); ``z``: classifier
        logits (the disagreement is with their argmax, the label the classifier gives)."""
        if not self.conditional:
            return relaxed_bpd(self.density, x, relax)[:, None]  # (B, 1)
        k, b = self.density.num_classes, len(x)
        labels = [torch.full((b,), c, device=x.device) for c in range(k)]
        pixels = torch.stack(
            [relaxed_pixel_log_prob(self.density, x, y, relax).flatten(1) for y in labels], 1
        )  # (B, K, D)
        per_class = pixels.sum(2)  # (B, K)
        label = z.argmax(1, keepdim=True)  # (B, 1)
        given = per_class.gather(1, label).squeeze(1)  # (B,)
        surprise = top_surprise(-pixels[torch.arange(b, device=x.device), label[:, 0]], self.surprise_pixels)
        disagree = (torch.logsumexp(per_class, 1) - given) / (self.density.num_dims * math.log(2.0))  # (B,)
        return torch.stack([surprise, disagree], 1)  # (B, 2)

    @torch.no_grad()
    def exact(self, levels: Tensor, prediction: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """The exact scores of 8-bit images (levels, (N, C, H, W)) with the classifier's labels: (N, J)."""
        if not self.conditional:
            return self.density.bpd(levels).double().cpu().numpy()[:, None]
        per_class, surprise = class_scores(
            self.density, levels, batch_size, levels.device, self.surprise_pixels
        )
        scores = conditional_scores(per_class, prediction, self.density.num_dims, surprise)
        return np.stack([scores[suffix] for suffix in COMBINED], 1)  # (N, 2)

    def flagged(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray((scores > np.asarray(self.thresholds)).any(1))  # (N,)


class DetectorAware(nn.Module):
    """Classifier logits plus the detected logit ``max_k z_k + scale max_j (s_j - τ_j)``: (B, K + 1),
    the largest exactly when a score ``s_j`` of the detector exceeds its threshold ``τ_j``.

    With ``trace`` a list, every forward call appends the batch's first relaxed score (BPD) and the
    classifier's label, so an attack's progress can be plotted.
    """

    def __init__(self, classifier: nn.Module, detector: Detector, scale: float, relax: bool = True) -> None:
        super().__init__()
        self.classifier, self.density, self.detector = classifier, detector.density, detector
        self.scale, self.relax = scale, relax
        self.thresholds = torch.tensor(detector.thresholds)
        self.trace: list[tuple[Tensor, Tensor]] | None = None

    def forward(self, x: Tensor) -> Tensor:
        z = self.classifier(x)  # (B, K)
        scores = self.detector.relaxed(x, z, self.relax)  # (B, J)
        excess = (scores - self.thresholds.to(scores)).max(1).values  # (B,)
        detected = z.max(1).values + self.scale * excess  # (B,)
        if self.trace is not None:
            self.trace.append((scores[:, 0].detach().cpu(), z.argmax(1).detach().cpu()))
        return torch.cat([z, detected[:, None]], 1)  # (B, K + 1)


@dataclasses.dataclass(frozen=True)
class AdaptiveResult:
    """One adaptive attack set on N images, judged after rounding to 8 bits.

    ``success``: the classifier is fooled (prediction ≠ label) and the attack did not return its failure
    sentinel; ``evaded``: the detector does not flag it (exact scores); ``joint``: both. ``bpd``: the
    detector's first exact score (BPD; the surprise for a conditional detector). The
    summary's ``evasion_rate`` is over the successful ones (1 − the detector's TPR on them), so
    ``joint_success = classifier_success × evasion_rate``.
    """

    attack_set: AttackSet
    adversarial: np.ndarray  # (N, C, H, W) uint8
    target: np.ndarray
    prediction: np.ndarray
    bpd: np.ndarray
    success: np.ndarray
    evaded: np.ndarray
    joint: np.ndarray
    failed: np.ndarray
    linf: np.ndarray
    l2: np.ndarray
    scale: float
    seconds_per_image: float
    score_name: str = "bpd"  # what ``bpd`` holds: "surprise" for a conditional detector

    def summary(self) -> dict[str, float]:
        ok = self.success
        return {
            "n": float(len(ok)),
            "classifier_success": float(ok.mean()),
            "evasion_rate": float(self.evaded[ok].mean()) if ok.any() else math.nan,
            "joint_success": float(self.joint.mean()),
            "failed": float(self.failed.sum()),
            f"mean_{self.score_name}": float(self.bpd.mean()),
            "mean_linf": float(self.linf[ok].mean()) if ok.any() else math.nan,
            "mean_l2": float(self.l2[ok].mean()) if ok.any() else math.nan,
            "scale": self.scale,
            "seconds_per_image": self.seconds_per_image,
        }


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """No parameter gradients inside the block (the attack differentiates the input only); restored after."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def runner_up(classifier: nn.Module, x: Tensor) -> Tensor:
    """The target of the targeted attack: each image's second most likely class, (B,)."""
    with torch.no_grad():
        return classifier(x).topk(2, dim=1).indices[:, 1]


def _foolbox_attack(attack: str, epsilon: float | None, config: AdaptiveConfig, steps: int) -> fb.Attack:
    attack = attack.replace("_cond_", "_")  # the same attacks against the conditional detector
    if attack == "adaptive_pgd":
        return fb.attacks.LinfPGD(
            steps=steps, rel_stepsize=config.pgd_rel_stepsize, random_start=config.pgd_random_start
        )
    if attack == "adaptive_cw":
        return fb.attacks.L2CarliniWagnerAttack(
            binary_search_steps=config.cw_binary_search_steps,
            steps=steps,
            stepsize=config.cw_stepsize,
            confidence=config.cw_confidence,
            initial_const=config.cw_initial_const,
        )
    raise ValueError(f"unknown adaptive attack {attack!r}; valid: {', '.join(ADAPTIVE_ATTACKS)}")


def run_adaptive(
    classifier: nn.Module,
    detector: Detector,
    images_uint8: np.ndarray,
    labels: np.ndarray,
    attack_set: AttackSet,
    scale: float,
    config: AdaptiveConfig,
    *,
    steps: int | None = None,
    relax: bool | None = None,
    trace: list[tuple[Tensor, Tensor]] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> AdaptiveResult:
    """One adaptive attack: ``adaptive[_cond]_pgd`` at ``attack_set.epsilon``, or ``adaptive[_cond]_cw``."""
    relax = config.relax if relax is None else relax
    steps = steps or (config.cw_steps if attack_set.attack.endswith("_cw") else config.pgd_steps)
    device = torch.device(device)
    classifier, density = classifier.to(device).eval(), detector.density.to(device).eval()
    wrapped = DetectorAware(classifier, detector, scale, relax).eval()
    fmodel = fb.PyTorchModel(wrapped, bounds=(0.0, 1.0), device=device)
    attack = _foolbox_attack(attack_set.attack, attack_set.epsilon, config, steps)
    x_all = torch.as_tensor(images_uint8).float() / 255.0  # (N, C, H, W)
    advs, targets = [], []
    start = time.perf_counter()
    with seeded(config.seed, device), frozen(classifier, density):
        for i in tqdm(range(0, len(x_all), config.batch_size), desc=attack_set.slug, disable=not progress):
            xb = x_all[i : i + config.batch_size].to(device)  # (B, C, H, W)
            target = runner_up(classifier, xb)  # (B,)
            wrapped.trace = trace
            criterion = fb.criteria.TargetedMisclassification(target)
            _, clipped, _ = attack(fmodel, xb, criterion, epsilons=attack_set.epsilon)
            wrapped.trace = None
            advs.append(clipped.detach().clamp(0, 1).cpu().numpy())
            targets.append(target.cpu().numpy())
    seconds = (time.perf_counter() - start) / max(len(x_all), 1)
    raw = np.concatenate(advs)  # (N, C, H, W) in [0, 1]
    failed = failure_sentinel(x_all.numpy(), raw, attack_set.epsilon)
    adversarial = np.rint(raw * 255.0).clip(0, 255).astype(np.uint8)
    with torch.no_grad():
        levels = torch.as_tensor(adversarial).float().to(device)  # (N, C, H, W)
        prediction = classifier(levels / 255.0).argmax(1).cpu().numpy()
    scores = detector.exact(levels, prediction)  # (N, J): BPD (conditional: surprise) first
    bpd = scores[:, 0]
    linf, l2 = perturbation_norms((adversarial.astype(np.float64) - images_uint8.astype(np.float64)) / 255.0)
    success = (prediction != np.asarray(labels)) & ~failed
    evaded = ~detector.flagged(scores)
    return AdaptiveResult(
        attack_set=attack_set,
        adversarial=adversarial,
        target=np.concatenate(targets),
        prediction=prediction,
        bpd=bpd,
        success=success,
        evaded=evaded,
        joint=success & evaded,
        failed=failed,
        linf=linf,
        l2=l2,
        scale=scale,
        seconds_per_image=seconds,
        score_name="surprise" if detector.conditional else "bpd",
    )


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One PGD run of the strength check: its setting, the mean relaxed BPD of the iterate per step,
    the fraction classified as the target while under the threshold per step, and the final result."""

    scale: float
    relax: bool
    bpd_per_step: np.ndarray
    joint_per_step: np.ndarray
    result: AdaptiveResult

    @property
    def label(self) -> str:
        return f"scale {self.scale:g}" + ("" if self.relax else ", straight-through only")


def strength_sweep(
    classifier: nn.Module,
    detector: Detector,
    images_uint8: np.ndarray,
    labels: np.ndarray,
    epsilon: float,
    config: AdaptiveConfig,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[SweepRun]:
    """PGD at ``epsilon`` for ``config.sweep_steps`` steps, once per scale in ``config.scales`` (relaxed)
    and once at the middle scale with straight-through gradients only: is the attack as strong as it
    can be made, and does it drive the adversarial BPD down to the clean BPD?"""
    settings = [(s, True) for s in config.scales]
    settings.append((config.scales[len(config.scales) // 2], False))
    runs = []
    with torch.no_grad():
        x = torch.as_tensor(images_uint8).float().to(device) / 255.0  # (N, C, H, W)
        targets = runner_up(classifier.to(device), x).cpu().numpy()
    for scale, relax in settings:
        trace: list[tuple[Tensor, Tensor]] = []
        result = run_adaptive(
            classifier,
            detector,
            images_uint8,
            labels,
            AttackSet("adaptive_pgd", epsilon),
            scale,
            dataclasses.replace(config, batch_size=len(images_uint8)),
            steps=config.sweep_steps,
            relax=relax,
            trace=trace,
            device=device,
            progress=progress,
        )
        bpd = torch.stack([b for b, _ in trace]).numpy()  # (calls, N)
        hit = torch.stack([p for _, p in trace]).numpy() == targets  # (calls, N)
        under = bpd <= detector.thresholds[0]
        runs.append(SweepRun(scale, relax, bpd.mean(1), (hit & under).mean(1), result))
    return runs


def sweep_figure(runs: Sequence[SweepRun], clean_bpd: float, threshold: float) -> Figure:
    """Mean BPD of the PGD iterate per step for each setting, against the clean mean and the threshold."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_bpd, ax_joint = fig.subplots(1, 2)
    for run in runs:
        style = "-" if run.relax else "--"
        ax_bpd.plot(run.bpd_per_step, style, label=run.label)
        ax_joint.plot(run.joint_per_step, style, label=run.label)
    ax_bpd.axhline(clean_bpd, color="black", linestyle=":", label="clean mean")
    ax_bpd.axhline(threshold, color="tab:red", linestyle=":", label="threshold τ")
    ax_bpd.set(xlabel="PGD step (forward call)", ylabel="mean BPD of the iterate", title="BPD per step")
    ax_joint.set(
        xlabel="PGD step (forward call)",
        ylabel="fraction: target class and BPD ≤ τ",
        title="joint success per step (before rounding)",
        ylim=(0, 1.02),
    )
    ax_bpd.legend(fontsize=8)
    ax_joint.legend(fontsize=8)
    return fig


def detector_threshold(
    classifier: nn.Module,
    density: ARModel,
    test: dict[str, np.ndarray],
    attack: AttackParams,
    score: ScoreParams,
    fpr: float,
    device: torch.device,
) -> tuple[Detector, np.ndarray]:
    """(the detector, the attacked originals): ``density``'s detector with its own threshold(s), ``fpr``
    on the score stage's clean ``calib`` images, and the test indices the oblivious attacks attacked."""
    images, labels = test["images"], test["labels"]
    attacked = select_correct(classifier, images, labels, attack.num_images, param="attack.num_images")
    correct = predict(classifier, images) == labels
    _, calib = clean_test_pools(correct, attacked, score.num_test, score.num_calib, score.seed)
    if not density.num_classes:
        calib_bpd, _ = score_bpd(density, images[calib], None, score, device, progress=False)
        return Detector(density, (threshold_at_fpr(calib_bpd, fpr),)), attacked
    levels = torch.as_tensor(images[calib]).float().to(device)  # (N, C, H, W)
    unset = Detector(density, (), score.surprise_pixels)
    calib_scores = unset.exact(levels, predict(classifier, images[calib]), score.batch_size)
    return Detector(density, union_thresholds(calib_scores, fpr), score.surprise_pixels), attacked


@dataclasses.dataclass(frozen=True)
class AdaptiveRun:
    """The adaptive stage's work on images ``index`` of the test split: the sweep, the strongest relaxed
    scale, one result per adaptive set at that scale, and the same attacks against the conditional
    detector (``conditional``) on the first of those originals."""

    model: str
    detector: Detector
    index: np.ndarray  # (N,) test indices
    images: np.ndarray  # (N, C, H, W) uint8 originals
    labels: np.ndarray
    clean_bpd: np.ndarray  # (N,)
    sweep: list[SweepRun]
    scale: float
    results: list[AdaptiveResult]
    conditional: tuple[str, Detector, list[AdaptiveResult]] | None = None

    @property
    def threshold(self) -> float:
        return self.detector.thresholds[0]

    def metrics(self, sweep_steps: int) -> dict[str, Any]:
        """data/metrics/adaptive.json (read back by the detect stage)."""
        out: dict[str, Any] = {
            "model": self.model,
            "threshold": self.threshold,
            "scale": self.scale,
            "clean_bpd_mean": float(self.clean_bpd.mean()),
            "sets": {r.attack_set.slug: r.summary() for r in self.results},
            "sweep": {
                f"{r.label} ({r.result.attack_set.slug}, {sweep_steps} steps)": {
                    **r.result.summary(),
                    "final_relaxed_bpd": float(r.bpd_per_step[-1]),
                }
                for r in self.sweep
            },
        }
        if self.conditional is not None:
            name, detector, results = self.conditional
            out["conditional"] = {
                "model": name,
                "thresholds": dict(zip(("surprise", "disagree"), detector.thresholds)),
                "sets": {r.attack_set.slug: r.summary() for r in results},
            }
        return out

    def save(self, folder: Path) -> list[Path]:
        """One attack-set file per result, sweep.png and examples.png in ``folder``; returns the figures."""
        runs = [(self.detector, self.results)] + ([self.conditional[1:]] if self.conditional else [])
        for detector, results in runs:
            n = len(results[0].bpd) if results else 0
            for r in results:
                save_attack_set(folder, r, self.index[:n], self.labels[:n], target=r.target, bpd=r.bpd,
                                evaded=r.evaded, joint=r.joint, threshold=detector.thresholds[0],
                                scale=self.scale)  # fmt: skip
        n_sweep = len(self.sweep[0].result.bpd)  # the sweep attacks the first sweep_images originals
        sweep = sweep_figure(self.sweep, float(self.clean_bpd[:n_sweep].mean()), self.threshold)
        examples = adversarial_figure(self.images, self.labels, self.results)
        return [save_figure(sweep, folder / "sweep.png"), save_figure(examples, folder / "examples.png")]

    @property
    def all_results(self) -> list[AdaptiveResult]:
        """Every adaptive set: against the BPD detector, then against the conditional one."""
        return self.results + (self.conditional[2] if self.conditional else [])

    def lines(self) -> list[str]:
        results = self.all_results
        return [
            f"{slug}: classifier fooled {m['classifier_success']:.0%}, of those not flagged "
            f"{m['evasion_rate']:.0%}, both {m['joint_success']:.0%} (scale {self.scale:g})"
            for slug, m in ((r.attack_set.slug, r.summary()) for r in results)
        ]


def load_densities(
    params: AdaptiveParams, folder: Path, device: torch.device
) -> tuple[ARModel, ARModel | None]:
    """The attacked model and the conditional one (None when ``conditional_model`` is null) from
    ``folder``; a missing checkpoint fails before any work, naming it."""
    from ardetect.models import load_model, trained_model_paths

    names = [params.model] + ([params.conditional_model] if params.conditional_model else [])
    paths = trained_model_paths(folder, names)
    model = load_model(paths[params.model]).to(device)
    cond = params.conditional_model
    return model, load_model(paths[cond]).to(device) if cond else None


def adaptive_attacks(
    classifier: nn.Module,
    density: ARModel,
    test: dict[str, np.ndarray],
    params: AdaptiveParams,
    attack: AttackParams,
    score: ScoreParams,
    fpr: float,
    device: torch.device,
    conditional: ARModel | None = None,
) -> AdaptiveRun:
    """The adaptive stage: τ (:func:`detector_threshold`), the strength sweep (PGD at the first ε on
    ``sweep_images`` originals, per scale), then every adaptive set on the first ``params.num_images``
    attacked originals at the strongest relaxed scale; with a ``conditional`` model, PGD at the first ε
    and CW against its combined detector on the first ``params.conditional_images`` of them."""
    detector, attacked = detector_threshold(classifier, density, test, attack, score, fpr, device)
    index = attacked[: params.num_images]
    x, y = test["images"][index], test["labels"][index]
    n, eps, progress = params.sweep_images, params.epsilons[0], params.progress
    sweep = strength_sweep(classifier, detector, x[:n], y[:n], eps, params, device=device, progress=progress)
    scale = max((r for r in sweep if r.relax), key=lambda r: r.result.joint.mean()).scale  # the strongest
    sets = [AttackSet("adaptive_pgd", e) for e in params.epsilons] + [AttackSet("adaptive_cw")]
    results = [
        run_adaptive(classifier, detector, x, y, s, scale, params, device=device, progress=progress)
        for s in sets
    ]
    clean_bpd, _ = score_bpd(density, x, None, score, device, progress=False)
    cond = None
    if conditional is not None and params.conditional_model is not None:
        cond_detector, _ = detector_threshold(classifier, conditional, test, attack, score, fpr, device)
        m = params.conditional_images
        cond_sets = [AttackSet("adaptive_cond_pgd", eps), AttackSet("adaptive_cond_cw")]
        cond_results = [
            run_adaptive(classifier, cond_detector, x[:m], y[:m], s, scale, params,
                         steps=params.conditional_steps, device=device, progress=progress)
            for s in cond_sets
        ]  # fmt: skip
        cond = (params.conditional_model, cond_detector, cond_results)
    return AdaptiveRun(params.model, detector, index, x, y, clean_bpd, sweep, scale, results, cond)
