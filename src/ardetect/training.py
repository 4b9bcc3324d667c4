"""Maximum-likelihood training of the density models: minibatch Adam, early stopping on validation NLL.

``fit`` is the density models' recipe (schedule, checkpoints, resume) over the one epoch loop in
``ardetect.loop``. The whole training set lives on the device as one tensor (no DataLoader): shuffling is
an index permutation, and dynamic binarisation draws a fresh binary copy of the gray levels each epoch.

A run can resume after a kill: with ``resume_path``, ``fit`` writes the whole ``TrainState`` there after
every epoch (weights, optimizer, schedule, RNG streams, early-stopping counters, history) and, when
started again on the same problem, continues from the next epoch. On the CPU the resumed run ends with
the same weights, bit for bit, as a run that was never interrupted.

Several processes (GPUs or machines) train one model together when launched by ``torchrun``: call
``ardetect.distributed.init_distributed()`` first, then ``fit`` as usual in every process. Each global
batch is split into one shard per rank and every update equals the single-process update on the whole
batch (``ardetect.distributed``). Validation is sharded and all-reduced; only rank 0 writes checkpoints
and the resume file, logs and prints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, Union

import pandas as pd
import torch
from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    ValidationError,
)
from torch import Tensor, nn
from tqdm.auto import tqdm

from ardetect.conditional import class_log_probs
from ardetect.configs import Device, as_plain, config_dataclass, error_lines
from ardetect.data import BinarizeParams, TrainingData, first_eval_images, mutation_resampler, training_data
from ardetect.distributed import Ranks
from ardetect.loop import EpochStats, Plan, Task, TrainState, train_epochs
from ardetect.loop import NonFiniteLossError as NonFiniteLossError  # raised by fit; stages catch it here
from ardetect.models import (
    REGISTRY,
    ARModel,
    atomic_torch_save,
    checkpoint_dict,
    load_checkpoint,
    model_class,
    save_model,
)


@config_dataclass
class TrainParams:
    """``train.defaults`` in params.yaml (with ``models.<name>.train`` on top: ``Params.train_params``)."""

    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 500
    epochs: PositiveInt = 5
    lr: PositiveFloat = 1e-3
    lr_schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: PositiveFloat | None = 1.0
    patience: PositiveInt = 3
    max_train_images: PositiveInt | None = None
    max_minutes: PositiveFloat | None = None
    seed: NonNegativeInt = 0
    device: Device = "auto"
    amp: bool = True
    compile: bool = False
    channels_last: bool = False  # conv models on CUDA: measured +6-8% PixelCNN training on an H200
    num_samples: PositiveInt = 16
    # class-conditional models: test images (the first N) for the marginal NLL and the generative
    # classifier's accuracy, K passes each (null: the whole test split); the conditional NLL uses all
    marginal_test_images: PositiveInt | None = 500
    # the first N val images (the val NLL that picks the best epoch) and test images (the reported test
    # NLL, with its standard error) of every model; null: all. On a 2-core CPU the evaluation of the full
    # val and test splits cost the 8-bit gated PixelCNN 60 of its 160 s
    eval_images: PositiveInt | None = 2000
    progress: bool = True


@config_dataclass
class EntryBase:
    """``models.<name>`` in params.yaml: an architecture, its levels, its config, its training overrides.

    ``ModelEntry`` is the union of one subclass per registered architecture, told apart by ``arch``, whose
    ``hparams`` is that architecture's frozen config: params.yaml is validated once, and ``entry.hparams``
    is the config the model is built from (``models.<name>.hparams.hidden`` → ``MADEConfig.hidden``).
    """

    arch: str
    levels: Literal[2, 256] = 2
    hparams: Any = None  # the architecture's Config (each subclass narrows the type)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Ren et al. (2019)'s background model: this fraction of training pixels is mutated afresh each epoch
    # (``data.mutation_resampler``). A model with mutation_rate > 0 is a background, never a detector.
    mutation_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # a class-conditional model p(x | y) (the PixelCNN family): trained on (image, label) pairs; scored
    # by its exact marginal p(x) = (1/K) Σ_y p(x | y), its BPD given the classifier's label, and both
    conditional: bool = False

    @property
    def is_background(self) -> bool:
        return self.mutation_rate > 0

    def build(self, image_shape: Sequence[int], num_classes: int = 0) -> ARModel:
        """The model this entry describes, with fresh weights (seed the RNG first for a seeded run);
        a conditional entry models ``num_classes`` classes (the dataset's)."""
        config = self.hparams
        if self.conditional:
            if num_classes < 2:
                raise ValueError(
                    f"a conditional {self.arch} needs the dataset's class count, got {num_classes}"
                )
            config = dataclasses.replace(config, num_classes=num_classes)
        return model_class(self.arch)(image_shape, config, self.levels)  # type: ignore[call-arg]


def _entry_class(cls: type[ARModel]) -> type[EntryBase]:
    config = cls.Config  # type: ignore[attr-defined]
    namespace = {
        "__annotations__": {"arch": Literal[cls.name], "hparams": config},  # type: ignore[valid-type]
        "hparams": dataclasses.field(default_factory=config),
        "__module__": __name__,
        "__doc__": f"``models.<name>`` with ``arch: {cls.name}``; ``hparams``: ``{config.__name__}``.",
    }
    return config_dataclass(type(f"{cls.__name__}Entry", (EntryBase,), namespace))


ENTRY_CLASSES: dict[str, type[EntryBase]] = {name: _entry_class(cls) for name, cls in REGISTRY.items()}
if TYPE_CHECKING:
    ModelEntry: TypeAlias = EntryBase
else:
    ModelEntry = Annotated[Union[tuple(ENTRY_CLASSES.values())], Field(discriminator="arch")]  # noqa: UP007


def model_entry_of(raw: dict[str, Any]) -> EntryBase:
    """One ``models.<name>`` mapping, validated into its architecture's entry (tests, notebooks)."""
    entry: EntryBase = TypeAdapter(ModelEntry).validate_python(raw)
    return entry


@config_dataclass
class TrainSection:
    """``train`` in params.yaml: which entries of ``models`` to train, and the shared defaults."""

    models: list[str] = dataclasses.field(default_factory=lambda: ["fvsbn", "nade", "made"])
    defaults: TrainParams = dataclasses.field(default_factory=TrainParams)


def detector_models(train: TrainSection, models: dict[str, ModelEntry]) -> list[str]:
    """``train.models`` without the background models: the models whose BPD detects anything (score,
    adaptive, CLI). Background models are trained by the same ``train`` stage but only serve as the
    reference of a likelihood ratio (the ``ood`` stage)."""
    return [name for name in train.models if not (name in models and models[name].is_background)]


def model_train_params(defaults: TrainParams, entry: ModelEntry) -> TrainParams:
    """A model's training params: ``train.defaults`` with ``models.<name>.train`` on top."""
    return dataclasses.replace(defaults, **entry.train)


def _takes_labels(entry_class: type[EntryBase]) -> bool:
    config = typing.get_type_hints(entry_class)["hparams"]
    return "num_classes" in {f.name for f in dataclasses.fields(config)}


def model_problems(train: TrainSection, models: dict[str, ModelEntry]) -> list[str]:
    """What is wrong with the models to train: unknown names, architectures, levels, hparams, overrides."""
    problems = [
        f"train.models[{i}] = {name!r}: no such entry under models (defined: {', '.join(models) or 'none'})"
        for i, name in enumerate(train.models)
        if name not in models
    ]
    conditional_archs = sorted(a for a, c in ENTRY_CLASSES.items() if _takes_labels(c))
    for name, entry in models.items():
        cls = model_class(entry.arch)
        if entry.levels not in cls.supported_levels:
            problems.append(
                f"models.{name}.levels = {entry.levels}: {entry.arch} supports {list(cls.supported_levels)}"
            )
        if entry.conditional and entry.arch not in conditional_archs:
            problems.append(
                f"models.{name}.conditional = true: {entry.arch} has no class-conditional form "
                f"(conditional architectures: {', '.join(conditional_archs)})"
            )
        if getattr(entry.hparams, "num_classes", 0):
            problems.append(
                f"models.{name}.hparams.num_classes: set by the data; write `conditional: true` instead"
            )
        if entry.conditional and entry.levels != 256:
            problems.append(
                f"models.{name}.conditional = true: class-conditional models are 8-bit (levels: 256)"
            )
        if entry.conditional and entry.is_background:
            problems.append(f"models.{name}: a background model (mutation_rate > 0) cannot be conditional")
        try:
            TypeAdapter(TrainParams).validate_python({**dataclasses.asdict(train.defaults), **entry.train})
        except ValidationError as err:
            fields = [f.name for f in dataclasses.fields(TrainParams)]
            problems += error_lines(err, TrainParams, ("models", name, "train"), fields)
    return problems


class ResumeIgnoredWarning(UserWarning):
    """A resume file exists but cannot continue this run (other settings or data, unreadable); training
    starts from scratch and overwrites it."""


#: Bumped when the layout of the resume file changes; older files are then ignored.
RESUME_FORMAT = 1
#: Train settings that do not change the training trajectory, so changing them keeps a run resumable.
_NOT_IN_RUN_IDENTITY = frozenset({"progress", "num_samples", "marginal_test_images"})


@dataclass(frozen=True)
class FitResult:
    best_epoch: int
    best_val_nll: float
    history: list[dict[str, float]]
    seconds: float
    train_images_per_second: float


class _TrainingLoss(nn.Module):
    """``model.training_nll`` as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: ARModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.model.training_nll(x) if y is None else self.model.training_nll(x, y)


@torch.inference_mode()
def evaluate_nll(
    model: ARModel, data: Tensor, batch_size: int, device: torch.device, labels: Tensor | None = None
) -> Tensor:
    """Per-image NLL in nats (float64, on the CPU), exact: no autocast at evaluation. With ``labels``
    (class-conditional models) the conditional -log p(x | y), without them -log p(x)."""
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        y = None if labels is None else labels[i : i + batch_size].to(device)
        out.append(-model.log_prob(data[i : i + batch_size].to(device), y).double().cpu())
    return torch.cat(out)  # (N,)


def mean_nll(
    model: ARModel,
    data: Tensor,
    batch_size: int,
    device: torch.device,
    ranks: Ranks,
    labels: Tensor | None = None,
) -> float:
    """Mean per-image NLL of ``data``; with several ranks each evaluates one shard and the sums are
    all-reduced, so every rank gets the same value (and makes the same early-stopping decisions)."""
    if not ranks.distributed:
        return evaluate_nll(model, data, batch_size, device, labels).mean().item()
    shard = ranks.shard(data)
    total = torch.zeros((), dtype=torch.float64, device=device)
    if len(shard):
        shard_labels = None if labels is None else ranks.shard(labels)  # the same split as the images
        total += evaluate_nll(model, shard, batch_size, device, shard_labels).sum().to(device)
    return ranks.sum(total).item() / len(data)


def nats_to_bpd(nll: float, num_dims: int) -> float:
    return nll / (num_dims * math.log(2.0))


def _scheduler(
    opt: torch.optim.Optimizer, params: TrainParams, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if params.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    if params.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=0.5, patience=max(0, params.patience // 2)
        )
    return None


def _plan(model: ARModel, params: TrainParams, device: torch.device) -> Plan:
    """The loop's part of the recipe: early stopping on validation NLL (an improvement is > 1e-6 nats)."""
    return Plan(
        name=model.name,
        epochs=params.epochs,
        batch_size=params.batch_size,
        patience=params.patience,
        monitor="val_nll",
        min_delta=1e-6,
        max_images=params.max_train_images,
        grad_clip=params.grad_clip,
        amp=params.amp and device.type == "cuda",
        max_minutes=params.max_minutes,
        progress=params.progress,
        hint="Lower the learning rate (lr) or set grad_clip for this model in params.yaml.",
    )


class _Likelihood(Task):
    """Maximum likelihood of an ARModel on fixed images or a fresh draw per epoch; validation NLL."""

    def __init__(
        self,
        model: ARModel,
        train: Tensor | Callable[[int], Tensor],
        first: Tensor,
        val: Tensor,
        params: TrainParams,
        device: torch.device,
        ranks: Ranks,
        checkpoint_path: Path,
        labels: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.model, self.train, self.first, self.val = model, train, first, val
        self.labels = labels  # (train, val) labels of a class-conditional model: MLE on (x, y) pairs
        self.eval_batch_size, self.device, self.ranks = params.eval_batch_size, device, ranks
        self.checkpoint_path = checkpoint_path
        self.trainer = ranks.wrap(_TrainingLoss(model))

    def draw(self, epoch: int) -> tuple[Tensor, ...]:
        images = self.first if epoch == 1 or not callable(self.train) else self.train(epoch)
        return (images,) if self.labels is None else (images, self.labels[0])

    def loss(self, *batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.trainer(*batch), {}  # mean NLL over this rank's images (given their labels)

    def evaluate(self) -> dict[str, float]:
        val_labels = None if self.labels is None else self.labels[1]
        nll = mean_nll(self.model, self.val, self.eval_batch_size, self.device, self.ranks, val_labels)
        return {"val_nll": nll}

    def record(self, stats: EpochStats) -> dict[str, float]:
        train_nll, val_nll, dims = stats.train["loss"], stats.val["val_nll"], self.model.num_dims
        return {
            "epoch": float(stats.epoch),
            "train_nll": train_nll,
            "val_nll": val_nll,
            "train_bpd": nats_to_bpd(train_nll, dims),
            "val_bpd": nats_to_bpd(val_nll, dims),
            "lr": stats.lr,
            "epoch_seconds": stats.train_seconds,
            "train_images_per_second": stats.images / stats.train_seconds,
        }

    def postfix(self, loss: float) -> dict[str, str]:
        return {"nll": f"{loss:.2f}", "bpd": f"{nats_to_bpd(loss, self.model.num_dims):.4f}"}

    def kept(self, state: TrainState) -> str:
        if not state.best_epoch:
            return "no checkpoint was written yet (no epoch finished)"
        return (
            f"the last good checkpoint is kept at {self.checkpoint_path} "
            f"(epoch {state.best_epoch}, val NLL {state.best_value:.3f} nats)"
        )


def fit(
    model: ARModel,
    train: Tensor | Callable[[int], Tensor],
    val: Tensor,
    params: TrainParams,
    *,
    checkpoint_path: Path,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    resume_path: Path | None = None,
    on_resume: Callable[[list[dict[str, float]]], None] | None = None,
    labels: tuple[Tensor, Tensor] | None = None,
) -> FitResult:
    """Train ``model`` in place and leave it holding the best validation weights.

    A class-conditional model (``model.num_classes > 0``) needs ``labels`` = (train labels, val labels):
    it maximises log p(x | y) on the pairs, and validation NLL is the conditional one.

    ``train`` is a fixed tensor of images or ``draw(epoch) -> images`` (fresh dynamic binarisation;
    it must be a function of ``epoch`` and the global torch RNG only). The best checkpoint is written
    atomically to ``checkpoint_path`` whenever validation improves.

    With ``resume_path``, the full training state (``TrainState.state_dict``) is written there atomically
    after every epoch (including a copy of the best checkpoint, so it is self-contained), and a run started
    again resumes from it when it belongs to the same run: same architecture, config, train settings
    (except ``progress``/``num_samples``), ``checkpoint_extra``, initial weights, first-epoch training
    images and validation images. Otherwise it is ignored with a ``ResumeIgnoredWarning`` and training
    starts over. On resume ``checkpoint_path`` is rewritten if it does not hold the run's best epoch (a
    kill between the two writes, or a deleted file), and ``on_resume(history)`` is called with the
    restored epochs' records (``on_epoch`` is only called for epochs trained in this call). The resume
    file is left in place after a successful fit, marked finished: a rerun returns at once with the best
    weights (useful when the caller is killed after ``fit``). Delete it once the results are safely
    stored; the train stage does.

    Under ``torch.distributed`` (after ``ardetect.distributed.init_distributed()`` in torchrun workers)
    every rank calls ``fit`` with the same arguments and data and trains its shard of each batch, so that
    every update is the single-process one (``Ranks``). Only rank 0 reads and writes ``checkpoint_path``
    and ``resume_path`` (the resume state is broadcast to the other ranks), calls ``on_epoch``/``on_resume``
    and shows progress; at the end its best weights are broadcast, so no shared filesystem is needed.
    """
    ranks = Ranks.current()
    torch.manual_seed(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    _place(model, params, device)
    val = val.to(device)
    first = train(1) if callable(train) else train.to(device)
    n = min(len(first), params.max_train_images or len(first))
    opt = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    sched = _scheduler(opt, params, math.ceil(n / params.batch_size) * params.epochs)
    plan = _plan(model, params, device)
    state = TrainState(model, opt, sched, gen, device, best_value=plan.worst)
    if bool(model.num_classes) != (labels is not None):
        raise ValueError(f"{model.name}: pass labels exactly when the model is class-conditional")
    labels = None if labels is None else (labels[0].to(device), labels[1].to(device))
    identity = (
        _run_identity(model, params, checkpoint_extra, first, val, labels)
        if resume_path and ranks.lead
        else {}
    )
    if resume_path is not None:
        _resume(state, resume_path, identity, checkpoint_path, ranks, on_resume)
    extra = {**(checkpoint_extra or {}), "train_params": dataclasses.asdict(params)}
    task = _Likelihood(model, train, first, val, params, device, ranks, checkpoint_path, labels)
    for record in train_epochs(state, task, plan, ranks):
        if not ranks.lead:
            continue
        if on_epoch is not None:
            on_epoch(record)
        if params.progress:
            tqdm.write(_summary(model.name, record))
        if state.best_epoch == state.epoch:  # improved
            state.best = _best_checkpoint(model, state, extra)
            atomic_torch_save(state.best, checkpoint_path)
        if resume_path is not None:
            atomic_torch_save({"format": RESUME_FORMAT, "run": identity, **state.state_dict()}, resume_path)
    if ranks.lead:
        model.load_state_dict(state.best["state_dict"])
    ranks.weights_from_lead(model)  # not from a (maybe unshared) disk
    return FitResult(
        best_epoch=state.best_epoch,
        best_val_nll=state.best_value,
        history=state.history,
        seconds=state.elapsed(),
        train_images_per_second=state.seen / max(state.train_seconds, 1e-9),
    )


def _summary(name: str, record: dict[str, float]) -> str:
    """One line per epoch: a progress log that survives the progress bar."""
    return (
        f"{name} epoch {int(record['epoch'])}: train {record['train_nll']:.3f} nats, "
        f"val {record['val_nll']:.3f} nats ({record['val_bpd']:.4f} bpd), "
        f"{record['train_images_per_second']:.0f} img/s"
    )


def _place(model: ARModel, params: TrainParams, device: torch.device) -> None:
    """Move ``model`` to ``device``; on CUDA optionally channels-last and compiled."""
    model.to(device)
    if params.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if params.compile and device.type == "cuda":
        model.compile()


def _best_checkpoint(model: ARModel, state: TrainState, extra: dict[str, Any]) -> dict[str, Any]:
    """The best epoch's checkpoint, its weights copied: on the CPU ``.cpu()`` aliases the live weights,
    and the state keeps it past this epoch (for the resume file and the weights ``fit`` returns)."""
    ckpt = checkpoint_dict(model, epoch=state.epoch, val_nll=state.best_value, **extra)
    ckpt["state_dict"] = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    return ckpt


def _resume(
    state: TrainState,
    path: Path,
    identity: dict[str, Any],
    checkpoint_path: Path,
    ranks: Ranks,
    on_resume: Callable[[list[dict[str, float]]], None] | None,
) -> None:
    """Continue the run saved in ``path`` if it is this run (rank 0 reads it; every rank loads it)."""
    saved = ranks.from_lead(_resumable_state(path, identity) if ranks.lead else None)
    if saved is None:
        return
    best = saved["best_checkpoint"]
    if ranks.lead and not _holds_epoch(checkpoint_path, best["epoch"], best["val_nll"]):
        atomic_torch_save(best, checkpoint_path)
    state.load_state_dict(saved)
    if on_resume is not None and ranks.lead:
        on_resume(list(state.history))


def _digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of ``tensors`` (any device, any dtype)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _run_identity(
    model: ARModel,
    params: TrainParams,
    extra: dict[str, Any] | None,
    first: Tensor,
    val: Tensor,
    labels: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """What a resume file must match to continue this run (plain data, readable in a warning)."""
    train = dataclasses.asdict(params)
    labelled = {} if labels is None else {"labels": _digest({"train": labels[0], "val": labels[1]})}
    return {
        **labelled,
        "format": RESUME_FORMAT,
        "arch": model.name,
        "image_shape": list(model.image_shape),
        "levels": model.levels,
        "config": as_plain(dataclasses.asdict(model.config)),  # type: ignore[call-overload]
        "train_params": {k: v for k, v in train.items() if k not in _NOT_IN_RUN_IDENTITY},
        "checkpoint_extra": json.loads(json.dumps(extra or {}, sort_keys=True, default=str)),
        "initial_weights": _digest(model.state_dict()),
        "train_images": _digest({"epoch_1": first}),
        "val_images": _digest({"val": val}),
    }


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new))
            for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        ]
    return [] if old == new else [f"{prefix.rstrip('.')} ({old!r} -> {new!r})"]


def _resumable_state(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The training state in ``path`` if it continues this run, else None (with a warning if it exists)."""
    if not path.exists():
        return None

    def ignore(why: str) -> None:
        warnings.warn(
            f"ignoring the resume file {path}: {why}; training starts from scratch", ResumeIgnoredWarning, 3
        )

    try:
        state = load_checkpoint(path)
    except Exception as err:  # unreadable for any reason: starting over is always safe
        ignore(f"it cannot be read ({type(err).__name__}: {err})")
        return None
    if state.get("format") != RESUME_FORMAT or state.get("run") != identity:
        diff = _differences(state.get("run"), identity) if isinstance(state.get("run"), dict) else []
        ignore(f"it belongs to another run ({'; '.join(diff[:5]) or 'another file format'})")
        return None
    return state


def _holds_epoch(path: Path, epoch: int, val_nll: float) -> bool:
    try:
        ckpt = load_checkpoint(path)
    except Exception:
        return False
    return (ckpt.get("epoch"), ckpt.get("val_nll")) == (epoch, val_nll)


# ------------------------------------------------------------------ one model of params.yaml, end to end


def model_entry(models: dict[str, ModelEntry], name: str) -> ModelEntry:
    """``models.<name>`` of params.yaml, or a ParamsError naming the defined models."""
    from ardetect.configs import ParamsError

    if name not in models:
        raise ParamsError(f"no model {name!r} under models in params.yaml (defined: {', '.join(models)})")
    return models[name]


@dataclass(frozen=True)
class DensityTraining:
    """One density model's seeded run as the train stage does it: data, initial weights, fit, evaluation."""

    name: str
    entry: ModelEntry
    params: TrainParams
    model: ARModel
    data: TrainingData
    train: Tensor | Callable[[int], Tensor]  # a background model (Ren et al.) sees fresh mutations per epoch
    device: torch.device

    @classmethod
    def prepare(
        cls,
        name: str,
        train: TrainSection,
        models: dict[str, ModelEntry],
        binarize: BinarizeParams,
        folder: Path,
    ) -> DensityTraining:
        """``models.<name>`` (``train.defaults`` under its overrides) on the splits in ``folder``."""
        from ardetect.devices import resolve_device

        entry = model_entry(models, name)
        params = model_train_params(train.defaults, entry)
        device = resolve_device(params.device, f"models.{name}.train.device (or train.defaults.device)")
        b = binarize
        data = training_data(folder, entry.levels, b.mode, b.resample_train, b.seed + params.seed, device)
        data = first_eval_images(data, params.eval_images)
        train_set = (
            mutation_resampler(data.train, entry.mutation_rate, entry.levels, params.seed)
            if entry.is_background
            else data.train
        )
        torch.manual_seed(params.seed)  # model initialisation is part of the seeded run
        model = entry.build(data.image_shape, data.num_classes)
        return cls(name, entry, params, model, data, train_set, device)

    def logged_params(self, binarize: BinarizeParams, world_size: int) -> dict[str, Any]:
        return {
            "model": as_plain(dataclasses.asdict(self.entry)),
            "train": dataclasses.asdict(self.params),
            "binarize": dataclasses.asdict(binarize),
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "world_size": world_size,
        }

    def fit(self, checkpoints: Path, log: Callable[..., None] | None = None) -> FitResult:
        """:func:`fit` with ``checkpoints/best.pt`` and the resume file ``checkpoints/last.pt``; ``log(record,
        step=epoch)`` gets every epoch's record, a resumed run's earlier epochs included."""

        def resumed(history: list[dict[str, float]]) -> None:
            print(
                f"{self.name}: resuming from {checkpoints / 'last.pt'} after epoch {len(history)}", flush=True
            )
            for r in history:  # the tracking run is new: give it the whole learning curve
                if log is not None:
                    log(r, step=int(r["epoch"]))

        return fit(
            self.model,
            self.train,
            self.data.val,
            self.params,
            checkpoint_path=checkpoints / "best.pt",
            device=self.device,
            on_epoch=(lambda r: log(r, step=int(r["epoch"]))) if log is not None else None,
            checkpoint_extra={"name": self.name},
            resume_path=checkpoints / "last.pt",
            on_resume=resumed,
            labels=(self.data.labels["train"], self.data.labels["val"]) if self.model.num_classes else None,
        )

    def metrics(self, result: FitResult) -> dict[str, float]:
        """Test NLL/BPD of the best weights (on the first ``eval_images`` test images), with the standard
        error of the mean and the fit's summary (data/metrics/train/<name>.json).

        A class-conditional model's test NLL is its marginal's, on the first ``marginal_test_images`` test
        images (K passes each); on the same images it also reports the conditional NLL and the accuracy
        of its generative classifier argmax_y p(x | y)."""
        model, test, batch, dims = (
            self.model,
            self.data.test,
            self.params.eval_batch_size,
            self.model.num_dims,
        )
        extra: dict[str, float] = {}
        if model.num_classes:
            n = min(len(test), self.params.marginal_test_images or len(test))
            per_class = torch.from_numpy(class_log_probs(model, test[:n], batch, self.device))  # (n, K)
            marginal = torch.logsumexp(per_class, 1) - math.log(model.num_classes)  # (n,)
            per_image = -marginal  # (n,)
            labels = self.data.labels["test"][:n]
            cond_nll = evaluate_nll(model, test[:n], batch, self.device, labels).mean().item()
            extra = {
                "test_marginal_images": float(n),
                "test_cond_nll": cond_nll,
                "test_cond_bpd": nats_to_bpd(cond_nll, dims),
                "gen_accuracy": (per_class.argmax(1) == labels[:n]).double().mean().item(),
            }
        else:
            per_image = evaluate_nll(model, test, batch, self.device)  # (N,)
        test_nll, n_test = per_image.mean().item(), len(per_image)
        if n_test > 1:  # the standard error of the mean over the test images
            extra["test_bpd_se"] = nats_to_bpd(per_image.std().item() / math.sqrt(n_test), dims)
        return {
            "test_nll": test_nll,
            "test_bpd": nats_to_bpd(test_nll, dims),
            "test_images": float(n_test),
            **extra,
            "best_val_nll": result.best_val_nll,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "train_seconds": result.seconds,
            "train_images_per_second": result.train_images_per_second,
        }

    def publish(self, result: FitResult, model_dir: Path, history_csv: Path) -> dict[str, float]:
        """Write ``model_dir`` (model.pt with :meth:`metrics`, samples.png: a seeded sample grid) and the
        learning curve; return the metrics."""
        from torchvision.utils import save_image

        metrics = self.metrics(result)
        gen = torch.Generator(device=self.device).manual_seed(self.params.seed)
        samples = self.model.sample(self.params.num_samples, gen)  # (S, C, H, W) levels
        model_dir.mkdir()
        save_model(self.model, model_dir / "model.pt", name=self.name, metrics=metrics)
        save_image(
            samples.float().cpu() / (self.model.levels - 1), model_dir / "samples.png", nrow=8, padding=1
        )
        pd.DataFrame(result.history).to_csv(history_csv, index=False)
        return metrics

    @staticmethod
    def forget_resume(checkpoints: Path) -> None:
        """Call once the outputs are published: a rerun must train afresh (`dvc repro -f`), not return this
        run's result. Until then a finished last.pt lets a stage killed after training skip to publishing."""
        (checkpoints / "last.pt").unlink(missing_ok=True)

    def summary(self, metrics: dict[str, float]) -> str:
        return (
            f"{self.name}: test NLL {metrics['test_nll']:.2f} nats, {metrics['test_bpd']:.4f} bpd "
            f"(best epoch {metrics['best_epoch']}, {metrics['train_images_per_second']:.0f} img/s)"
        )
