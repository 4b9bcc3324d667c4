"""A small CNN classifier for (C, H, W) gray images, the target the attacks try to fool.

Images come in as uint8 gray levels ``(N, C, H, W)`` (or floats already in [0, 1]); the network sees
``gray / 255`` in [0, 1], the same bounds Foolbox attacks in. Training is plain Adam on cross-entropy
through the one epoch loop (``ardetect.loop``), early-stopped on validation accuracy; the weights of the
best epoch are kept.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor, nn

from ardetect.configs import Device, config_dataclass
from ardetect.devices import resolve_device
from ardetect.loop import EpochStats, Plan, Task, TrainState, train_epochs
from ardetect.models import atomic_torch_save, checkpoint_dict, load_checkpoint

ArrayLike = np.ndarray | Tensor
History = list[dict[str, float]]


@config_dataclass
class ClassifierConfig:
    """Architecture and training recipe of the CNN (two conv blocks, one hidden dense layer)."""

    channels: tuple[PositiveInt, PositiveInt] = (32, 64)
    hidden: PositiveInt = 128
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    num_classes: Annotated[int, Field(ge=2)] = 10
    epochs: PositiveInt = 4
    batch_size: PositiveInt = 128
    lr: PositiveFloat = 2e-3
    weight_decay: NonNegativeFloat = 0.0
    patience: PositiveInt = 2
    seed: NonNegativeInt = 0


@config_dataclass
class ClassifierParams(ClassifierConfig):
    """``classifier`` in params.yaml: the recipe plus where and how verbosely to run it."""

    device: Device = "auto"
    progress: bool = True


class SmallCNN(nn.Module):
    """conv3x3-ReLU-pool twice, then dense-ReLU-dense to logits; needs H, W >= 4 (8x8 and 28x28 work)."""

    name = "small_cnn"  # the checkpoint's ``arch``

    def __init__(self, image_shape: Sequence[int], config: ClassifierConfig) -> None:
        super().__init__()
        c, h, w = (int(s) for s in image_shape)
        if h < 4 or w < 4:
            raise ValueError(f"SmallCNN needs images of at least 4x4, got {h}x{w}")
        self.image_shape = (c, h, w)
        self.config = config
        c1, c2 = config.channels
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(config.dropout),
            nn.Linear(c2 * (h // 4) * (w // 4), config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.num_classes),
        )
        # channels-last convolutions (oneDNN's native layout): 1.2x training throughput on 2 cores; the
        # same values and state_dict (an NCHW checkpoint loads as is)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of images x in [0, 1], shape (B, C, H, W)."""
        h = self.features(x.contiguous(memory_format=torch.channels_last))  # (B, c2, H/4, W/4)
        return self.head(h)  # (B, num_classes)


@contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seed torch's global RNGs inside the block and restore them afterwards."""
    dev = torch.device(device)
    devices = (
        [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def unit_images(images: ArrayLike) -> Tensor:
    """uint8 gray levels -> float32 in [0, 1]; floats must already lie in [0, 1]. Shape (N, C, H, W)."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 gray levels or floats in [0, 1], got dtype {x.dtype}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"float images must lie in [0, 1], got values in [{x.min().item():g}, {x.max().item():g}]"
        )
    return x.float()


def as_labels(labels: ArrayLike, n: int) -> Tensor:
    """Integer class labels (N,) as a long tensor, checked against the number of images."""
    y = torch.as_tensor(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"expected {n} labels of shape ({n},), got shape {tuple(y.shape)}")
    return y.long()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def logits_of(model: nn.Module, images: ArrayLike, batch_size: int = 512) -> Tensor:
    """Logits (N, num_classes) on the CPU, in eval mode, batch by batch."""
    x = unit_images(images)
    device = model_device(model)
    model.eval()
    starts = range(0, len(x), batch_size) if len(x) else [0]  # no images: one empty batch, (0, classes)
    return torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in starts])


def predict(model: nn.Module, images: ArrayLike, batch_size: int = 512) -> np.ndarray:
    """Predicted class of each image, int64 array (N,)."""
    return logits_of(model, images, batch_size).argmax(1).numpy().astype(np.int64)


def accuracy(model: nn.Module, images: ArrayLike, labels: ArrayLike, batch_size: int = 512) -> float:
    """Fraction of images classified correctly."""
    y = as_labels(labels, len(images)).numpy()
    return float((predict(model, images, batch_size) == y).mean()) if len(y) else float("nan")


class _Classification(Task):
    """Cross-entropy on labelled images, validation accuracy: ``train_classifier``'s part of the loop."""

    def __init__(self, model: SmallCNN, x: Tensor, y: Tensor, xv: Tensor, yv: Tensor) -> None:
        self.model, self.x, self.y, self.xv, self.yv = model, x, y, xv, yv

    def draw(self, epoch: int) -> tuple[Tensor, Tensor]:
        return self.x, self.y  # (N, C, H, W) in [0, 1], (N,)

    def loss(self, *batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        xb, yb = batch  # (B, C, H, W), (B,)
        logits = self.model(xb)  # (B, num_classes)
        return F.cross_entropy(logits, yb), {"correct": (logits.argmax(1) == yb).sum()}

    def evaluate(self) -> dict[str, float]:
        return {"val_accuracy": accuracy(self.model, self.xv, self.yv)}

    def record(self, stats: EpochStats) -> dict[str, float]:
        return {
            "epoch": float(stats.epoch),
            "train_loss": stats.train["loss"],
            "train_accuracy": stats.train["correct"],
            "val_accuracy": stats.val["val_accuracy"],
            "seconds": time.perf_counter() - stats.started,  # the whole epoch, validation included
        }


def train_classifier(
    train_x: ArrayLike,
    train_y: ArrayLike,
    val_x: ArrayLike,
    val_y: ArrayLike,
    config: ClassifierConfig,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
) -> tuple[SmallCNN, History]:
    """Train with Adam and cross-entropy; stop after ``patience`` epochs without a better val accuracy.

    Returns the model holding the best epoch's weights (in eval mode) and one dict per epoch
    (``epoch, train_loss, train_accuracy, val_accuracy, seconds``), each also passed to ``on_epoch``.
    """
    x = unit_images(train_x)
    y = as_labels(train_y, len(x))
    xv, yv = unit_images(val_x), as_labels(val_y, len(val_x))
    if len(x) == 0 or len(xv) == 0:
        raise ValueError("train_classifier needs at least one training and one validation image")
    if tuple(xv.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"train images are {tuple(x.shape[1:])}, validation images {tuple(xv.shape[1:])}")
    if int(max(y.max(), yv.max())) >= config.num_classes or int(min(y.min(), yv.min())) < 0:
        raise ValueError(f"labels must lie in [0, num_classes={config.num_classes})")
    device = resolve_device(str(device))
    plan = Plan(
        name="classifier",
        epochs=config.epochs,
        batch_size=config.batch_size,
        patience=config.patience,
        monitor="val_accuracy",
        maximize=True,
        progress=progress,
        hint="Lower the learning rate (classifier.lr) in params.yaml.",
    )
    with seeded(config.seed, device):  # initial weights and dropout
        model = SmallCNN(x.shape[1:], config).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        gen = torch.Generator().manual_seed(config.seed)  # the epochs' permutations
        state = TrainState(model, opt, None, gen, device, best_value=plan.worst)
        for record in train_epochs(state, _Classification(model, x, y, xv, yv), plan):
            if on_epoch is not None:
                on_epoch(record)
            if state.best_epoch == state.epoch:
                state.best = copy.deepcopy(model.state_dict())
    model.load_state_dict(state.best)
    return model.eval(), state.history


def save_classifier(model: SmallCNN, path: str | os.PathLike[str], **extra: Any) -> None:
    """Write shape, resolved config and CPU weights: a dict that ``torch.load(weights_only=True)`` reads."""
    atomic_torch_save(checkpoint_dict(model, **extra), path)


def load_classifier(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> SmallCNN:
    """Rebuild a classifier written by ``save_classifier`` (safe load), in eval mode on ``device``."""
    ckpt = load_checkpoint(path)
    if ckpt.get("arch") != SmallCNN.name:
        raise ValueError(f"{path} is not a classifier checkpoint (arch={ckpt.get('arch')!r})")
    model = SmallCNN(ckpt["image_shape"], ClassifierConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()
