"""Foolbox 3 attacks on the classifier, with the adversarial images rounded back to 8 bits.

The classifier sees ``gray / 255`` in [0, 1] (``fb.PyTorchModel(model.eval(), bounds=(0, 1))``).
Attacks, by name:

* ``fgsm``: one signed-gradient step of size ε (L∞, fixed ε).
* ``pgd``: L∞ projected gradient descent / BIM with a random start (fixed ε).
* ``noise``: uniform noise in [-ε, ε]^D (L∞, fixed ε), a control that is not optimised at all.
* ``deepfool``: DeepFool, a minimisation attack, L2 by default (the original DeepFool and PixelDefend's
  setting; ``deepfool_norm="linf"`` picks the L∞ variant). Unbounded: its ``epsilon`` is ``None``.
* ``cw``: Carlini-Wagner L2, a minimisation attack, unbounded, ``epsilon`` ``None``.

Success is Foolbox's own verdict, minus the attack's failure sentinel, and then re-checked after
rounding. Foolbox's ``L2CarliniWagnerAttack`` returns an all-zero image where it found no adversarial,
and its success flag then only asks whether the classifier mislabels that black square (it calls it
"sandal" on Fashion-MNIST), so a failed attack would count as a success. Every attack's output is
checked for that sentinel (:func:`failure_sentinel`); such images are failures and stay out of every
table. ``noise`` is a control, not an attack: detection scores every noisy image, whatever the
classifier says of it.

Fixed-ε attacks are called once per batch over the whole list of ε. Each ε (or ``None``) gives one
:class:`AttackResult`. A density model can only score 8-bit images, so with ``round_to_8bit`` the
adversarial images are rounded to the nearest of the 256 gray levels and success is re-checked on the
rounded image: an example counts as adversarial only if the rounded image still fools the classifier.
Minimisation attacks sit just across the decision boundary and spread sub-level changes over many
pixels that rounding erases: on Fashion-MNIST, L2 DeepFool (overshoot 0.02) fooled 100% before rounding
and ~32% after; CW (confidence 0) 99% and ~87%. Raise ``deepfool_overshoot`` / ``cw_confidence`` to
keep more of them.

Under ``torchrun`` each rank attacks one contiguous range of whole batches (``Ranks.shard_range`` with
``batch_size`` as the block) and the results are gathered in rank order: every batch is the very batch
one process attacks, so the results are the same, bit for bit, as one process's (with the same threads
per process). That takes two things. Batches, not images, are shared out, because an attack's arithmetic
on a batch (batched convolutions, CW's summed loss) may depend on its size and composition; so with
fewer batches than ranks some ranks idle (lower ``batch_size`` to spread a small N). And the attacks
draw from one seeded stream across batches (PGD's random start, the noise): a rank first advances the
stream past the draws of the batches before its own (:data:`RANDOM_DRAWS`, :func:`skip_random_draws`),
and :func:`check_stream_handover` fails if a rank did not start where the rank before it ended.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import foolbox as fb
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from pydantic import (
    BeforeValidator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
)
from torch import Tensor, nn
from tqdm.auto import tqdm

from ardetect.attacksets import AttackOutput, AttackSet, save_attack_set
from ardetect.classifier import ArrayLike, as_labels, predict, seeded
from ardetect.configs import Device, config_dataclass
from ardetect.distributed import Ranks

FIXED_EPSILON_ATTACKS = ("fgsm", "pgd", "noise")
MINIMIZATION_ATTACKS = ("deepfool", "cw", "cw_conf")  # cw_conf: Carlini-Wagner at cw_high_confidence
ATTACKS = FIXED_EPSILON_ATTACKS + MINIMIZATION_ATTACKS
#: Random tensors of the batch's shape that an attack draws from torch's global RNG per batch and ε, as
#: Foolbox 3.3 does it (``torch.rand`` through eagerpy's ``uniform``): PGD's random start
#: (``LinfBaseGradientDescent.get_random_start``) and the noise (``UniformMixin.sample_noise``).
#: FGSM, DeepFool and Carlini-Wagner draw nothing. :func:`check_stream_handover` catches a change.
RANDOM_DRAWS = {"pgd": 1, "noise": 1}


def _fraction(value: Any) -> Any:
    """Accept ε written as a fraction of the 8-bit scale, e.g. ``"8/255"``."""
    if isinstance(value, str) and "/" in value:
        num, den = value.split("/", 1)
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return value
    return value


Epsilon = Annotated[float, BeforeValidator(_fraction), Field(gt=0.0, le=1.0)]


@config_dataclass
class AttackConfig:
    """Which attacks to run and their budgets; ``epsilons`` are L∞ radii in [0, 1] units (gray/255)."""

    attacks: tuple[str, ...] = ("fgsm", "pgd", "deepfool", "cw", "cw_conf", "noise")
    epsilons: tuple[Epsilon, ...] = (8 / 255, 25 / 255, 51 / 255)
    pgd_steps: PositiveInt = 20
    pgd_rel_stepsize: PositiveFloat = 0.1
    deepfool_norm: Literal["l2", "linf"] = "l2"
    deepfool_steps: PositiveInt = 50
    deepfool_overshoot: NonNegativeFloat = 0.02
    cw_steps: PositiveInt = 50
    cw_binary_search_steps: PositiveInt = 4
    cw_confidence: NonNegativeFloat = 0.0
    cw_high_confidence: NonNegativeFloat = 5.0  # the `cw_conf` attack: a logit margin that survives rounding
    cw_stepsize: PositiveFloat = 0.02
    cw_initial_const: PositiveFloat = 1e-2
    round_to_8bit: bool = True
    batch_size: PositiveInt = 256
    seed: NonNegativeInt = 0

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in names if n not in ATTACKS]
        if unknown:
            raise ValueError(f"unknown attack(s) {unknown}; valid attacks: {', '.join(ATTACKS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"attacks must not repeat, got {list(names)}")
        if not names:
            raise ValueError(f"attacks must name at least one of: {', '.join(ATTACKS)}")
        return names

    @field_validator("epsilons")
    @classmethod
    def _distinct_epsilons(cls, eps: tuple[float, ...]) -> tuple[float, ...]:
        if len(set(eps)) != len(eps):
            raise ValueError(f"epsilons must not repeat, got {list(eps)}")
        return eps

    def __post_init__(self) -> None:
        if not self.epsilons and any(a in FIXED_EPSILON_ATTACKS for a in self.attacks):
            raise ValueError(f"epsilons is empty but fixed-ε attacks {FIXED_EPSILON_ATTACKS} were asked for")


@config_dataclass
class AttackParams(AttackConfig):
    """``attack`` in params.yaml."""

    num_images: PositiveInt = 200  # the first N test images the classifier gets right
    device: Device = "auto"
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class AttackResult:
    """One attack at one ε on N images; norms are of the perturbation in [0, 1] units.

    ``adversarial`` holds the images as they are scored: uint8 gray levels (N, 1, H, W) when rounded,
    float32 in [0, 1] otherwise. ``before_rounding`` is Foolbox's output (within the threat model),
    ``failed`` marks Foolbox's failure sentinel (an all-zero image, see :func:`failure_sentinel`),
    ``success_before_rounding`` is Foolbox's verdict on its output and not ``failed``, and ``success``
    additionally requires the classifier to be fooled by ``adversarial`` (``prediction``).
    ``seconds_per_image`` is the wall time of the Foolbox call that made this result (shared by all ε
    of one fixed-ε call) divided by N.
    """

    attack: str
    epsilon: float | None
    adversarial: np.ndarray
    before_rounding: np.ndarray
    success_before_rounding: np.ndarray
    success: np.ndarray
    failed: np.ndarray
    prediction: np.ndarray
    linf: np.ndarray
    l2: np.ndarray
    linf_before_rounding: np.ndarray
    l2_before_rounding: np.ndarray
    seconds_per_image: float

    @property
    def attack_set(self) -> AttackSet:
        return AttackSet(self.attack, self.epsilon)

    @property
    def name(self) -> str:
        """``"pgd ε=8/255"`` (or ``"pgd ε=0.1"`` off the 1/255 grid); ``"cw"`` when unbounded."""
        return self.attack_set.label


def build_attack(name: str, config: AttackConfig) -> fb.Attack:
    """The Foolbox attack object for ``name`` with the budgets in ``config``."""
    if name == "fgsm":
        return fb.attacks.FGSM()
    if name == "pgd":
        return fb.attacks.LinfPGD(steps=config.pgd_steps, rel_stepsize=config.pgd_rel_stepsize)
    if name == "noise":
        return fb.attacks.LinfAdditiveUniformNoiseAttack()
    if name == "deepfool":
        cls = fb.attacks.L2DeepFoolAttack if config.deepfool_norm == "l2" else fb.attacks.LinfDeepFoolAttack
        return cls(steps=config.deepfool_steps, overshoot=config.deepfool_overshoot)
    if name in ("cw", "cw_conf"):
        return fb.attacks.L2CarliniWagnerAttack(
            binary_search_steps=config.cw_binary_search_steps,
            steps=config.cw_steps,
            stepsize=config.cw_stepsize,
            confidence=config.cw_confidence if name == "cw" else config.cw_high_confidence,
            initial_const=config.cw_initial_const,
        )
    raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")


def _check_uint8_images(images: ArrayLike) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(
            f"images must be uint8 gray levels of shape (N, C, H, W), got {x.dtype} of shape {tuple(x.shape)}"
        )
    return x


def failure_sentinel(clean: np.ndarray, output: np.ndarray, epsilon: float | None) -> np.ndarray:
    """(N,) True where an attack returned its "nothing found" image: all zeros, for an original that is
    not within ``epsilon`` (L∞; unbounded: any original that is not itself all zero) of black.

    Foolbox's Carlini-Wagner starts from ``zeros_like(x)`` and returns that where no step was
    adversarial; a genuine adversarial is never exactly black (CW's tanh box cannot reach 0 on every
    pixel), and a bounded attack cannot reach black from a brighter image.
    """
    flat_out = output.reshape(len(output), -1)  # (N, D)
    flat_clean = clean.reshape(len(clean), -1)  # (N, D)
    reach = 0.0 if epsilon is None else epsilon
    return np.asarray((flat_out == 0).all(1) & (flat_clean.max(1, initial=0.0) > reach + 1e-6))


def perturbation_norms(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L∞ and L2 norm of each perturbation (N, ...), float64 arrays of shape (N,)."""
    flat = delta.reshape(len(delta), -1).astype(np.float64)  # (N, D)
    return np.abs(flat).max(1, initial=0.0), np.sqrt((flat**2).sum(1))


def rng_state(device: torch.device) -> Tensor:
    """The state of torch's global RNG that random tensors on ``device`` come from (a CPU byte tensor)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def skip_random_draws(
    draws: int, n: int, batch_size: int, shape: Sequence[int], device: torch.device | str
) -> None:
    """Advance torch's global RNG on ``device`` as ``draws`` float32 ``torch.rand`` tensors per batch of
    the first ``n`` images (batches of ``batch_size``, images of ``shape``) would: where the stream
    stands when one process reaches image ``n``."""
    for i in range(0, n, batch_size):
        for _ in range(draws):
            torch.rand((min(batch_size, n - i), *shape), dtype=torch.float32, device=device)


def check_stream_handover(ranks: Ranks, begin: Tensor, end: Tensor, what: str) -> None:
    """RuntimeError unless each rank's RNG state ``begin`` (before its first batch) is the state ``end``
    the rank before it ended with (after its last batch): a seeded stream shared out by batches must be
    the one stream of one process. Nothing to check for one process."""
    states = ranks.gather((begin, end))
    for r in range(1, len(states)):
        if not torch.equal(states[r][0], states[r - 1][1]):
            raise RuntimeError(
                f"{what}: rank {r} did not start from the random state rank {r - 1} ended with, so its "
                "results would differ from one process's; the attack draws random numbers other than "
                "ardetect.attacks.RANDOM_DRAWS says (a new Foolbox?)"
            )


def run_attacks(
    model: nn.Module,
    images_uint8: ArrayLike,
    labels: ArrayLike,
    config: AttackConfig,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[AttackResult]:
    """Run every attack in ``config`` on the given images; one result per attack and ε, in config order.

    Under ``torch.distributed`` every rank calls it with the same arguments, attacks its range of whole
    batches and gets every result (module docstring); only rank 0 shows progress."""
    x_all = _check_uint8_images(images_uint8)
    y_all = as_labels(labels, len(x_all))
    device = torch.device(device)
    model = model.to(device).eval()
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=device)
    clean = x_all.float().numpy() / 255.0  # (N, C, H, W)
    ranks = Ranks.current()
    mine = ranks.shard_range(len(x_all), config.batch_size)  # this rank's images, in whole batches
    results: list[AttackResult] = []
    for name in config.attacks:
        attack = build_attack(name, config)
        epsilons: list[float | None] = list(config.epsilons) if name in FIXED_EPSILON_ATTACKS else [None]
        batches: list[tuple[list[np.ndarray], list[np.ndarray]]] = []  # (E adversarials, E successes) each
        start = time.perf_counter()
        with seeded(config.seed, device):
            draws = RANDOM_DRAWS.get(name, 0) * len(epsilons)
            skip_random_draws(draws, mine.start, config.batch_size, x_all.shape[1:], device)
            begin = rng_state(device)
            steps = range(mine.start, mine.stop, config.batch_size)
            for i in tqdm(steps, desc=f"attack {name}", leave=False, disable=not (progress and ranks.lead)):
                xb = x_all[i : i + config.batch_size].to(device).float() / 255.0  # (B, C, H, W)
                yb = y_all[i : i + config.batch_size].to(device)  # (B,)
                _, clipped, success = attack(fmodel, xb, yb, epsilons=epsilons)  # success: (E, B)
                batches.append(
                    (
                        [clipped[k].detach().clamp(0, 1).cpu().numpy() for k in range(len(epsilons))],
                        [success[k].detach().cpu().numpy() for k in range(len(epsilons))],
                    )
                )
            end = rng_state(device)
        batches = ranks.gather_rows(batches)  # every rank's batches, in order: one process's
        check_stream_handover(ranks, begin, end, f"attack {name}")
        per_image = (time.perf_counter() - start) / max(len(x_all), 1)
        for k, eps in enumerate(epsilons):
            raw = np.concatenate([b[0][k] for b in batches]).astype(np.float32)  # (N, C, H, W) in [0, 1]
            failed = failure_sentinel(clean, raw, eps)
            foolbox_success = np.concatenate([b[1][k] for b in batches]).astype(bool) & ~failed
            if config.round_to_8bit:
                adversarial: np.ndarray = np.rint(raw * 255.0).clip(0, 255).astype(np.uint8)
                scored = adversarial.astype(np.float32) / 255.0
            else:
                adversarial = scored = raw
            pred = predict(model, adversarial, config.batch_size)
            linf, l2 = perturbation_norms(scored - clean)
            linf_raw, l2_raw = perturbation_norms(raw - clean)
            results.append(
                AttackResult(
                    attack=name,
                    epsilon=eps,
                    adversarial=adversarial,
                    before_rounding=raw,
                    success_before_rounding=foolbox_success,
                    success=foolbox_success & (pred != y_all.numpy()),
                    failed=failed,
                    prediction=pred,
                    linf=linf,
                    l2=l2,
                    linf_before_rounding=linf_raw,
                    l2_before_rounding=l2_raw,
                    seconds_per_image=per_image,
                )
            )
    return results


def attack_summary(results: Sequence[AttackResult]) -> pd.DataFrame:
    """One row per attack and ε: success rates before/after rounding, failure sentinels (count), mean
    norms of the successes (after rounding), time."""
    rows: list[dict[str, Any]] = []
    for r in results:
        ok = r.success
        rows.append(
            {
                "set": r.attack_set.slug,
                "attack": r.attack,
                "epsilon": np.nan if r.epsilon is None else r.epsilon,
                "n": len(ok),
                "success_before_rounding": float(r.success_before_rounding.mean()) if len(ok) else np.nan,
                "success_after_rounding": float(ok.mean()) if len(ok) else np.nan,
                "failed": int(r.failed.sum()),
                "mean_linf": float(r.linf[ok].mean()) if ok.any() else np.nan,
                "mean_l2": float(r.l2[ok].mean()) if ok.any() else np.nan,
                "seconds_per_image": r.seconds_per_image,
            }
        )
    return pd.DataFrame(rows)


def select_correct(
    model: nn.Module,
    images: ArrayLike,
    labels: ArrayLike,
    n: int,
    batch_size: int = 512,
    param: str = "num_images",
) -> np.ndarray:
    """Indices (n,) of the first ``n`` images the classifier gets right, in their original order.

    ``param`` names the setting that chose ``n``, for the error messages.
    """
    total = len(images)
    if n < 1:
        raise ValueError(f"{param} must be at least 1, got {n}")
    if n > total:
        raise ValueError(f"{param}={n} exceeds the {total} test images available")
    correct = np.flatnonzero(predict(model, images, batch_size) == as_labels(labels, total).numpy())
    if len(correct) < n:
        raise ValueError(
            f"only {len(correct)} of {total} test images are classified correctly, fewer than {param}={n}"
        )
    return correct[:n]


def adversarial_figure(
    originals: ArrayLike,
    labels: ArrayLike,
    results: Sequence[AttackOutput],
    n: int = 6,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Grid: the first ``n`` originals on top, each attack's adversarial versions below (title = prediction).

    Images where the attack did not fool the classifier (after rounding) are titled in gray. Where it
    failed outright (Foolbox's all-zero sentinel) there is no adversarial to show: the original is drawn
    faded, titled "failed", so no black square reads as an attack's output.
    """
    x = _check_uint8_images(originals).numpy()
    y = as_labels(labels, len(x)).numpy()
    n = min(n, len(x))

    def label(k: int) -> str:
        return class_names[k] if class_names is not None else str(k)

    rows = 1 + len(results)
    fig = Figure(figsize=(1.4 * n + 1.6, 1.5 * rows), layout="constrained")
    axes = fig.subplots(rows, n, squeeze=False)
    for j in range(n):
        axes[0, j].imshow(x[j, 0], cmap="gray", vmin=0, vmax=255)
        axes[0, j].set_title(label(int(y[j])), fontsize=8)
    axes[0, 0].set_ylabel("original", fontsize=8)
    for i, r in enumerate(results, start=1):
        imgs = r.adversarial.astype(np.float32) / (255.0 if r.adversarial.dtype == np.uint8 else 1.0)
        for j in range(n):
            if r.failed[j]:
                axes[i, j].imshow(x[j, 0], cmap="gray", vmin=0, vmax=255, alpha=0.25)
                axes[i, j].set_title("failed", fontsize=8, color="gray")
                continue
            axes[i, j].imshow(imgs[j, 0], cmap="gray", vmin=0, vmax=1)
            color = "tab:red" if r.success[j] else "gray"
            axes[i, j].set_title(label(int(r.prediction[j])), fontsize=8, color=color)
        axes[i, 0].set_ylabel(r.attack_set.label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def attack_metrics(summary: pd.DataFrame) -> dict[str, dict[str, float]]:
    """data/metrics/attack.json: :func:`attack_summary`'s rates, norms and wall time per set."""
    keys = (
        "success_before_rounding",
        "success_after_rounding",
        "failed",
        "mean_linf",
        "mean_l2",
        "seconds_per_image",
    )
    return {row["set"]: {k: float(row[k]) for k in keys} for _, row in summary.iterrows()}


def save_attacks(
    folder: Path, results: Sequence[AttackResult], index: np.ndarray, images: np.ndarray, labels: np.ndarray
) -> tuple[Path, Path]:
    """One attack-set file per result, summary.csv and examples.png in ``folder``; returns the last two.

    The summary leaves out wall time (it stays in attack.json, not cached): in data/attacks it would
    change the folder's hash on every run and rerun score and detect for nothing."""
    for r in results:
        save_attack_set(folder, r, index, labels, success_before_rounding=r.success_before_rounding)
    summary = folder / "summary.csv"
    attack_summary(results).drop(columns="seconds_per_image").to_csv(summary, index=False)
    examples = folder / "examples.png"
    adversarial_figure(images, labels, results).savefig(examples, dpi=120)
    return summary, examples


def attacked_originals(model: nn.Module, test: dict[str, np.ndarray], num_images: int) -> np.ndarray:
    """Indices of the first ``num_images`` test images the classifier gets right (``attack.num_images``)."""
    if num_images > len(test["labels"]):
        raise ValueError(
            f"attack.num_images = {num_images} exceeds the {len(test['labels'])} test images; "
            "lower it in params.yaml"
        )
    return select_correct(model, test["images"], test["labels"], num_images, param="attack.num_images")
