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

and the detect stage adds one that combines the first and the last (``m-combined``,
``detection.with_combined``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ardetect.models.base import ARModel

SUFFIXES = ("", "-pred", "-disagree")  # the scores of one conditional model ``m``: m, m-pred, m-disagree


@torch.inference_mode()
def class_log_probs(
    model: ARModel, levels: Tensor, batch_size: int, device: torch.device | str = "cpu"
) -> np.ndarray:
    """log p(x | y = k) in nats for every image (levels, (N, C, H, W)) and class: (N, K) float64.
    ``batch_size`` counts model rows (images × K)."""
    if not model.num_classes:
        raise ValueError(f"{model.name} is not class-conditional: it has no class log-likelihoods")
    model = model.to(device).eval()
    step = max(1, batch_size // model.num_classes)
    out = [
        model.class_log_probs(levels[i : i + step].to(device)).double().cpu()
        for i in range(0, len(levels), step)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, model.num_classes))  # (N, K)


def conditional_scores(per_class: np.ndarray, prediction: np.ndarray, num_dims: int) -> dict[str, np.ndarray]:
    """The three per-image scores in bits per dimension, keyed by model-name suffix (see module doc)."""
    per_class = np.asarray(per_class, np.float64)  # (N, K)
    k = per_class.shape[1]
    prediction = np.asarray(prediction, np.int64)
    if prediction.shape != per_class.shape[:1] or (
        prediction.size and not 0 <= prediction.min() <= prediction.max() < k
    ):
        raise ValueError(f"predictions must be one label in 0..{k - 1} per image")
    bits = num_dims * math.log(2.0)
    total = np.logaddexp.reduce(per_class, axis=1)  # (N,) log Σ_y p(x | y)
    given = per_class[np.arange(len(per_class)), prediction]  # (N,) log p(x | ŷ)
    return {
        "": -(total - math.log(k)) / bits,
        "-pred": -given / bits,
        "-disagree": (total - given) / bits,
    }
