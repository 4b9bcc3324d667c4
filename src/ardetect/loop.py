"""The one epoch loop every model here trains through (density models and the classifier).

A ``Task`` says what is trained: the epoch's training tensors, the minibatch loss, the validation
metrics and the history record. ``train_epochs`` runs minibatch steps over a seeded permutation, evaluates,
steps the schedule, applies early stopping (on a metric to minimise, e.g. NLL, or to maximise, e.g.
accuracy) and yields each epoch's record once ``TrainState`` holds it, so the caller can checkpoint the
state. ``TrainState`` is everything a killed run needs to continue bit for bit (``state_dict``). Under
``torch.distributed`` each rank trains its shard of every batch (``ardetect.distributed.Ranks``).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from tqdm.auto import tqdm

from ardetect.distributed import Ranks
from ardetect.models.base import ARModel

#: How often (in steps) the running training loss is checked for NaN/inf and shown.
CHECK_EVERY = 25


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the last good weights."""


@dataclass(frozen=True)
class Plan:
    """How long and how to train: the parts of a recipe the loop itself reads."""

    name: str  # shown in progress bars and errors
    epochs: int
    batch_size: int
    patience: int  # epochs without improvement of ``monitor`` before stopping
    monitor: str  # the validation metric early stopping watches (a key of ``Task.evaluate()``)
    maximize: bool = False  # accuracy is maximised, NLL minimised
    min_delta: float = 0.0  # an improvement smaller than this does not count
    max_images: int | None = None  # training images per epoch (a prefix of the permutation)
    grad_clip: float | None = None
    amp: bool = False  # bf16 autocast, on CUDA only
    max_minutes: float | None = None  # wall-clock budget, checked after each epoch (not reproducible)
    progress: bool = True
    hint: str = ""  # what to change when the loss diverges, appended to the error

    def improves(self, value: float, best: float) -> bool:
        return value > best + self.min_delta if self.maximize else value < best - self.min_delta

    @property
    def worst(self) -> float:
        """The starting "best" value: any finite first epoch improves on it."""
        return -math.inf if self.maximize else math.inf


@dataclass
class TrainState:
    """What must survive a kill: weights, optimizer, schedule, RNG streams, early stopping, history.

    ``best`` is the best epoch's snapshot (a checkpoint dict or weights), filled by the caller.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None
    generator: torch.Generator  # draws each epoch's permutation
    device: torch.device
    best_value: float = math.inf  # start from Plan.worst (-inf when the metric is maximised)
    epoch: int = 0  # the last finished epoch
    finished: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    bad_epochs: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    seen: int = 0  # training images over all epochs
    clock: float = field(default_factory=time.perf_counter)  # perf_counter() when the run (not call) began

    def elapsed(self) -> float:
        """Seconds since the run began, earlier (resumed) calls included."""
        return time.perf_counter() - self.clock

    def step(self, loss: Tensor, grad_clip: float | None) -> None:
        """One optimizer step on ``loss``; a per-step schedule advances (a plateau one steps per epoch)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
        self.optimizer.step()
        if self.scheduler is not None and not isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step()  # ReduceLROnPlateau subclasses LRScheduler but steps on a metric

    def end_epoch(self, record: dict[str, float], value: float, plan: Plan, images: int) -> None:
        """Book a finished epoch: history, early-stopping counters, throughput."""
        self.epoch += 1
        self.history.append(record)
        self.seen += images
        if plan.improves(value, self.best_value):
            self.best_value, self.best_epoch, self.bad_epochs = value, self.epoch, 0
        else:
            self.bad_epochs += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and containers (loads with ``weights_only=True``); RNGs are the global ones."""
        model = self.model
        return {
            "epoch": self.epoch,
            "finished": self.finished,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model_training_state": model.training_state() if isinstance(model, ARModel) else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "history": self.history,
            "best_val": self.best_value,
            "best_epoch": self.best_epoch,
            "best_checkpoint": self.best,
            "bad_epochs": self.bad_epochs,
            "train_seconds": self.train_seconds,
            "seen": self.seen,
            "seconds": self.elapsed(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if isinstance(self.model, ARModel):
            self.model.load_training_state(state["model_training_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and len(state["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch, self.finished, self.history = state["epoch"], state["finished"], state["history"]
        self.best_value, self.best_epoch = state["best_val"], state["best_epoch"]
        self.best, self.bad_epochs = state["best_checkpoint"], state["bad_epochs"]
        self.train_seconds, self.seen = state["train_seconds"], state["seen"]
        self.clock = time.perf_counter() - state["seconds"]  # a time budget counts the earlier run(s) too


@dataclass(frozen=True)
class EpochStats:
    """What one epoch measured, for ``Task.record`` to turn into a history record."""

    epoch: int
    train: dict[str, float]  # per-image means over the epoch's images: "loss" and the task's sums
    val: dict[str, float]  # Task.evaluate()
    lr: float
    train_seconds: float  # the training steps alone
    images: int
    started: float  # perf_counter() when the epoch began


class Task(ABC):
    """What is trained: data, loss, validation and the record, for ``train_epochs``."""

    @abstractmethod
    def draw(self, epoch: int) -> Sequence[Tensor]:
        """The epoch's training tensors, indexed together along dim 0 (images, and labels if any)."""

    @abstractmethod
    def loss(self, *batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss of a minibatch (what is minimised), and sums over its images to report per epoch."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Validation metrics of the current weights (``Plan.monitor`` among them)."""

    @abstractmethod
    def record(self, stats: EpochStats) -> dict[str, float]:
        """The epoch's history record (what ``train_epochs`` yields)."""

    def postfix(self, loss: float) -> dict[str, str]:
        """The progress bar's running numbers."""
        return {"loss": f"{loss:.3f}"}

    def kept(self, state: TrainState) -> str:
        """What the caller keeps when training diverges, for the error message."""
        return f"the best epoch so far is {state.best_epoch}" if state.best_epoch else "no epoch finished"


def train_epochs(
    state: TrainState, task: Task, plan: Plan, ranks: Ranks | None = None
) -> Iterator[dict[str, float]]:
    """Train from epoch ``state.epoch + 1`` until early stopping, ``plan.epochs`` or the time budget.

    Yields each epoch's record once ``state`` holds the epoch (``state.best_epoch == state.epoch`` when it
    improved), so the caller can snapshot the best weights and save the state before the next epoch.
    Raises ``NonFiniteLossError`` as soon as the training loss or the monitored metric is NaN or infinite.
    """
    ranks = ranks or Ranks()
    while not state.finished and state.epoch < plan.epochs:
        epoch, started = state.epoch + 1, time.perf_counter()
        train, images = _train_one_epoch(state, task, plan, ranks, epoch)
        if state.device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - started
        state.train_seconds += train_seconds
        val = task.evaluate()
        value = val[plan.monitor]
        if not math.isfinite(value):
            _diverged(state, task, plan, epoch, math.ceil(images / plan.batch_size), value)
        if isinstance(state.scheduler, ReduceLROnPlateau):
            state.scheduler.step(value)
        lr = state.optimizer.param_groups[0]["lr"]
        record = task.record(EpochStats(epoch, train, val, lr, train_seconds, images, started))
        state.end_epoch(record, value, plan, images)
        out_of_time = plan.max_minutes is not None and state.elapsed() > 60 * plan.max_minutes
        if plan.max_minutes is not None:  # rank 0's clock decides for all ranks
            out_of_time = ranks.flag_from_lead(out_of_time, state.device)
        state.finished = state.bad_epochs >= plan.patience or out_of_time or epoch == plan.epochs
        yield record


def _train_one_epoch(
    state: TrainState, task: Task, plan: Plan, ranks: Ranks, epoch: int
) -> tuple[dict[str, float], int]:
    """Minibatch steps over a fresh permutation; per-image means of the loss and the task's sums."""
    data = task.draw(epoch)
    n = min(len(data[0]), plan.max_images or len(data[0]))
    perm = torch.randperm(len(data[0]), generator=state.generator)[:n].to(data[0].device)
    steps, size = math.ceil(n / plan.batch_size), plan.batch_size
    use_amp = plan.amp and state.device.type == "cuda"
    state.model.train()
    totals: dict[str, Tensor] = {}
    done = totals
    label = f"{plan.name} epoch {epoch}/{plan.epochs}"
    bar = tqdm(
        range(steps), desc=label, disable=not (plan.progress and ranks.lead), leave=False, mininterval=1.0
    )
    for step in bar:
        batch = perm[step * size : (step + 1) * size]
        shard = ranks.shard(batch)
        # an empty shard (a last batch smaller than W) still joins the all-reduce, with weight 0
        xs = [t[shard if len(shard) else batch[:1]].to(state.device) for t in data]  # (B / W, ...)
        with torch.autocast(device_type=state.device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, sums = task.loss(*xs)  # mean over this rank's images
        state.step(ranks.scale(loss, len(shard), len(batch)), plan.grad_clip)
        if not totals:
            totals = {k: torch.zeros((), dtype=torch.float64, device=state.device) for k in ("loss", *sums)}
        if len(shard):
            totals["loss"] += loss.detach().double() * len(shard)
            for k, v in sums.items():
                totals[k] += v
        if step % CHECK_EVERY == 0 or step == steps - 1:
            done = {k: ranks.sum(v.clone()) for k, v in totals.items()}  # the same on every rank
            running = done["loss"].item() / min(n, (step + 1) * size)
            if not math.isfinite(running):  # every rank stops together
                _diverged(state, task, plan, epoch, step, running)
            bar.set_postfix(task.postfix(running))
    return {k: v.item() / n for k, v in done.items()}, n


def _diverged(state: TrainState, task: Task, plan: Plan, epoch: int, step: int, value: float) -> NoReturn:
    raise NonFiniteLossError(
        f"{plan.name}: the loss became {value} at epoch {epoch}, step {step}; training stopped and "
        f"{task.kept(state)}. {plan.hint}".rstrip()
    )
