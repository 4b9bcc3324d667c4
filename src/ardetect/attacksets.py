"""One name for one set of adversarial images: an attack at an L∞ radius (or unbounded).

``AttackSet("pgd", 8/255)`` is the value the whole pipeline passes around: its ``slug`` (``pgd_e8``)
names files and metrics, its ``label`` (``pgd ε=8/255``) titles tables and figures, and ``sort_key``
orders sets by attack family and then numerically by ε (8/255 before 25/255). ε is ``None`` for
unbounded attacks; NaN appears only at the parquet/CSV boundary (:meth:`AttackSet.of`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

#: Report order of the attack families; controls first, adaptive (defence-aware) attacks last.
FAMILIES = (
    "noise", "fgsm", "pgd", "deepfool", "cw", "cw_conf",
    "adaptive_pgd", "adaptive_cw", "adaptive_cond_pgd", "adaptive_cond_cw",
)  # fmt: skip
#: Not attacks: every image of such a set is a positive, whatever the classifier says of it.
CONTROLS = ("noise",)
ADAPTIVE_PREFIX = "adaptive_"


def format_epsilon(epsilon: float | None) -> str:
    """``8/255`` for ε on the 1/255 grid, ``0.1`` otherwise, ``—`` for unbounded (None or NaN)."""
    if epsilon is None or math.isnan(epsilon):
        return "—"
    levels = epsilon * 255
    return f"{round(levels)}/255" if abs(levels - round(levels)) < 1e-6 else f"{epsilon:.4g}"


@dataclasses.dataclass(frozen=True)
class AttackSet:
    """An attack family at one ε (``None``: unbounded, e.g. DeepFool or Carlini-Wagner)."""

    attack: str
    epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.epsilon is not None and math.isnan(self.epsilon):
            object.__setattr__(self, "epsilon", None)

    @classmethod
    def of(cls, attack: object, epsilon: object) -> AttackSet:
        """From table cells, where an unbounded ε is stored as NaN."""
        eps = None if epsilon is None else float(epsilon)  # type: ignore[arg-type]
        return cls(str(attack), None if eps is None or math.isnan(eps) else eps)

    @classmethod
    def from_slug(cls, slug: str) -> AttackSet:
        """The inverse of :attr:`slug`: ``pgd_e8`` → ``AttackSet("pgd", 8/255)``, ``cw`` → unbounded."""
        match = re.fullmatch(r"(.+)_e(\d+(?:\.\d*)?(?:e-?\d+)?)", slug)
        if match is None:
            return cls(slug)
        attack, eps = match.groups()
        return cls(attack, int(eps) / 255 if eps.isdigit() else float(eps))

    @property
    def epsilon_or_nan(self) -> float:
        """ε for a table cell (NaN when unbounded)."""
        return math.nan if self.epsilon is None else self.epsilon

    @property
    def slug(self) -> str:
        """File- and metric-safe: ``pgd_e8`` (8/255), ``pgd_e0.3`` off the 1/255 grid, ``cw`` unbounded."""
        if self.epsilon is None:
            return self.attack
        levels = self.epsilon * 255
        if abs(levels - round(levels)) < 1e-6:
            return f"{self.attack}_e{round(levels)}"
        return f"{self.attack}_e{self.epsilon:g}"

    @property
    def label(self) -> str:
        """``pgd ε=8/255``; the attack alone when unbounded."""
        return self.attack if self.epsilon is None else f"{self.attack} ε={format_epsilon(self.epsilon)}"

    @property
    def is_control(self) -> bool:
        return self.attack in CONTROLS

    @property
    def is_adaptive(self) -> bool:
        return self.attack.startswith(ADAPTIVE_PREFIX)

    @property
    def oblivious(self) -> AttackSet:
        """The defence-oblivious counterpart of an adaptive set (``adaptive_pgd_e8`` → ``pgd_e8``, also
        for the attack on the conditional detector: ``adaptive_cond_cw`` → ``cw``)."""
        return AttackSet(self.attack.removeprefix(ADAPTIVE_PREFIX).removeprefix("cond_"), self.epsilon)

    @property
    def sort_key(self) -> tuple[int, str, float]:
        family = FAMILIES.index(self.attack) if self.attack in FAMILIES else len(FAMILIES)
        return (family, self.attack, math.inf if self.epsilon is None else self.epsilon)


def sorted_sets(sets: Iterable[AttackSet]) -> list[AttackSet]:
    """Distinct sets in report order (family, then ε numerically)."""
    return sorted(set(sets), key=lambda s: s.sort_key)


class AttackOutput(Protocol):
    """One attack set's per-image results (an AttackResult, an AdaptiveResult): what its file holds and
    what the example figures draw."""

    @property
    def attack_set(self) -> AttackSet: ...
    @property
    def adversarial(self) -> np.ndarray: ...
    @property
    def prediction(self) -> np.ndarray: ...
    @property
    def success(self) -> np.ndarray: ...
    @property
    def failed(self) -> np.ndarray: ...
    @property
    def linf(self) -> np.ndarray: ...
    @property
    def l2(self) -> np.ndarray: ...


def save_attack_set(
    folder: Path, result: AttackOutput, source_index: np.ndarray, label: np.ndarray, **extra: Any
) -> Path:
    """Write one set as ``folder/<slug>.npz``: its attack and ε (NaN when unbounded, the file boundary's
    convention), the attacked originals (``source_index`` into the test split, ``label``), the images
    and per-image verdicts every set has, and ``extra`` arrays of its own."""
    path = folder / f"{result.attack_set.slug}.npz"
    np.savez(
        path,
        attack=result.attack_set.attack,
        epsilon=result.attack_set.epsilon_or_nan,
        source_index=source_index,
        label=label,
        adversarial=result.adversarial,
        prediction=result.prediction,
        success=result.success,
        failed=result.failed,
        linf=result.linf,
        l2=result.l2,
        **extra,
    )
    return path
