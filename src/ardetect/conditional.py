"""What a class-conditional density model p(x | y) says about an image and the classifier's label ŷ.

Minimal attacks (Carlini-Wagner) change the label while leaving the image almost untouched, so the
marginal p(x) barely moves, but p(x | ŷ_adv) does: the image still looks like its true class. From the
K class log-likelihoods ``log p(x | y)`` of one image (one pass per class) the score stage writes three
detectors, each as a score-table model named after the conditional model ``m`` (higher = more
suspicious, in the table's ``bpd`` column):

* ``m``: the marginal BPD, -log2 p(x) / D with p(x) = (1/K) Σ_y p(x | y) (uniform prior);
* ``m-pred``: the BPD under the classifier's label, -log2 p(x | ŷ) / D;
* ``m-disagree``: the generative disagreement -log2 p_gen(ŷ | x) / D, where
  -log p_gen(ŷ | x) = log Σ_y p(x | y) - log p(x | ŷ): how little the generative classifier believes ŷ;
* ``m-surprise``: the mean of the ``surprise_pixels`` largest per-pixel -log2 p(x_i | x_<i, ŷ), in bits
  per pixel: the few pixels an attack made improbable. A sum over all D pixels (the BPD) dilutes them
  in the spread between clean images' likelihoods: CW κ=5 costs its images ~136 nats of log p(x) (the
  median), yet the marginal BPD tells them from their originals at AUROC 0.60;

and the detect stage adds one that combines the last two (``m-combined``, ``detection.with_combined``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ardetect.models.base import ARModel

SUFFIXES = ("", "-pred", "-disagree", "-surprise")  # the scores of one conditional model ``m``
SURPRISE_PIXELS = 50  # default pixels of the surprise score (``score.surprise_pixels``)


def top_surprise(pixel_nll: Tensor, pixels: int) -> Tensor:
    """The mean of the ``pixels`` largest per-pixel NLLs (nats, (..., D)) in bits per pixel, (...)."""
    return pixel_nll.topk(min(pixels, pixel_nll.shape[-1]), dim=-1).values.mean(-1) / math.log(2.0)


@torch.inference_mode()
def class_scores(
    model: ARModel,
    levels: Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
    surprise_pixels: int = SURPRISE_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """For every image (levels, (N, C, H, W)) and class k: log p(x | y = k) in nats and the surprise
    under k (:func:`top_surprise` of ``surprise_pixels``), two (N, K) float64 arrays from the same K
    passes. ``batch_size`` counts model rows (images × K)."""
    if not model.num_classes:
        raise ValueError(f"{model.name} is not class-conditional: it has no class log-likelihoods")
    model = model.to(device).eval()
    step = max(1, batch_size // model.num_classes)
    log_probs, surprise = [np.zeros((0, model.num_classes))], [np.zeros((0, model.num_classes))]
    for i in range(0, len(levels), step):
        nll = model.class_pixel_nll(levels[i : i + step].to(device)).double()  # (B, K, D)
        log_probs.append(-nll.sum(2).cpu().numpy())  # (B, K)
        surprise.append(top_surprise(nll, surprise_pixels).cpu().numpy())  # (B, K)
    return np.concatenate(log_probs), np.concatenate(surprise)


def class_log_probs(
    model: ARModel, levels: Tensor, batch_size: int, device: torch.device | str = "cpu"
) -> np.ndarray:
    """log p(x | y = k) in nats for every image (levels, (N, C, H, W)) and class: (N, K) float64.
    ``batch_size`` counts model rows (images × K)."""
    return class_scores(model, levels, batch_size, device)[0]


def conditional_scores(
    per_class: np.ndarray, prediction: np.ndarray, num_dims: int, surprise: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The per-image scores keyed by model-name suffix (see module doc), from :func:`class_scores`'
    arrays; ``-surprise`` only when the per-class ``surprise`` is given."""
    per_class = np.asarray(per_class, np.float64)  # (N, K)
    k = per_class.shape[1]
    prediction = np.asarray(prediction, np.int64)
    if prediction.shape != per_class.shape[:1] or (
        prediction.size and not 0 <= prediction.min() <= prediction.max() < k
    ):
        raise ValueError(f"predictions must be one label in 0..{k - 1} per image")
    bits = num_dims * math.log(2.0)
    rows = np.arange(len(per_class))
    total = np.logaddexp.reduce(per_class, axis=1)  # (N,) log Σ_y p(x | y)
    given = per_class[rows, prediction]  # (N,) log p(x | ŷ)
    scores = {
        "": -(total - math.log(k)) / bits,
        "-pred": -given / bits,
        "-disagree": (total - given) / bits,
    }
    if surprise is not None:
        scores["-surprise"] = np.asarray(surprise, np.float64)[rows, prediction]  # (N,)
    return scores
