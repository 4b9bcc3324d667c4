"""Maximum-likelihood training: one plain loop, minibatch Adam, early stopping on validation NLL.

The whole training set lives on the device as one tensor (no DataLoader): shuffling is an index
permutation, and dynamic binarisation draws a fresh binary copy of the gray levels each epoch.

A run can resume after a kill: with ``resume_path``, ``fit`` writes the whole training state there after
every epoch (weights, optimizer, schedule, RNG streams, early-stopping counters, history) and, when
started again on the same problem, continues from the next epoch. On the CPU the resumed run ends with
the same weights, bit for bit, as a run that was never interrupted.

Several processes (GPUs or machines) train one model together when launched by ``torchrun``: call
``init_distributed()`` first, then ``fit`` as usual in every process. Each global batch of ``batch_size``
images is split into one contiguous shard per rank, DistributedDataParallel all-reduces the gradients, and
each rank's loss is weighted by its shard's share of the batch, so every update equals the single-process
update on the whole batch (uneven last batches included). Validation is sharded and all-reduced; only rank
0 writes checkpoints and the resume file, logs and prints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    ValidationError,
)
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ardetect.configs import Device, as_plain, config_dataclass, error_lines
from ardetect.models import (
    REGISTRY,
    ARModel,
    atomic_torch_save,
    checkpoint_dict,
    load_checkpoint,
    model_class,
)


@config_dataclass
class TrainParams:
    """``train.defaults`` in params.yaml (with ``models.<name>.train`` on top: ``Params.train_params``)."""

    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 1000
    epochs: PositiveInt = 10
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
    num_samples: PositiveInt = 64
    progress: bool = True


@config_dataclass
class ModelEntry:
    """``models.<name>`` in params.yaml: an architecture, its levels, its hparams, its training overrides."""

    arch: str
    levels: Literal[2, 256] = 2
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)


@config_dataclass
class TrainSection:
    """``train`` in params.yaml: which entries of ``models`` to train, and the shared defaults."""

    models: list[str] = dataclasses.field(default_factory=lambda: ["fvsbn", "nade", "made"])
    defaults: TrainParams = dataclasses.field(default_factory=TrainParams)


def model_train_params(defaults: TrainParams, entry: ModelEntry) -> TrainParams:
    """A model's training params: ``train.defaults`` with ``models.<name>.train`` on top."""
    return dataclasses.replace(defaults, **entry.train)


def model_problems(train: TrainSection, models: dict[str, ModelEntry]) -> list[str]:
    """What is wrong with the models to train: unknown names, architectures, levels, hparams, overrides."""
    problems = [
        f"train.models[{i}] = {name!r}: no such entry under models (defined: {', '.join(models) or 'none'})"
        for i, name in enumerate(train.models)
        if name not in models
    ]
    for name, entry in models.items():
        if entry.arch not in REGISTRY:
            problems.append(
                f"models.{name}.arch = {entry.arch!r}: unknown architecture "
                f"(allowed: {', '.join(sorted(REGISTRY))})"
            )
            continue
        cls = model_class(entry.arch)
        if entry.levels not in cls.supported_levels:
            problems.append(
                f"models.{name}.levels = {entry.levels}: {entry.arch} supports {list(cls.supported_levels)}"
            )
        config_cls = cls.Config  # type: ignore[attr-defined]
        names = [f.name for f in dataclasses.fields(config_cls)]
        try:
            TypeAdapter(config_cls).validate_python(entry.hparams)
        except ValidationError as err:
            problems += error_lines(err, config_cls, ("models", name, "hparams"), names)
        try:
            TypeAdapter(TrainParams).validate_python({**dataclasses.asdict(train.defaults), **entry.train})
        except ValidationError as err:
            fields = [f.name for f in dataclasses.fields(TrainParams)]
            problems += error_lines(err, TrainParams, ("models", name, "train"), fields)
    return problems


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the last good checkpoint."""


class ResumeIgnoredWarning(UserWarning):
    """A resume file exists but cannot continue this run (other settings or data, unreadable); training
    starts from scratch and overwrites it."""


#: Bumped when the layout of the resume file changes; older files are then ignored.
RESUME_FORMAT = 1
#: Train settings that do not change the training trajectory, so changing them keeps a run resumable.
_NOT_IN_RUN_IDENTITY = frozenset({"progress", "num_samples"})


@dataclass(frozen=True)
class FitResult:
    best_epoch: int
    best_val_nll: float
    history: list[dict[str, float]]
    seconds: float
    train_images_per_second: float


def init_distributed() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; returns (rank, world size).

    Without torchrun (``WORLD_SIZE`` unset or 1) it does nothing and returns (0, 1), so scripts that call it
    still run as one plain process. With CUDA each process uses GPU ``LOCAL_RANK`` and NCCL for CUDA
    tensors (gloo for CPU ones); without CUDA, gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless a process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _TrainingLoss(nn.Module):
    """``model.training_nll`` as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: ARModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.training_nll(x)


@torch.inference_mode()
def evaluate_nll(model: ARModel, data: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Per-image NLL in nats (float64, on the CPU), exact: no autocast at evaluation."""
    model.eval()
    out = [
        -model.log_prob(data[i : i + batch_size].to(device)).double().cpu()
        for i in range(0, len(data), batch_size)
    ]
    return torch.cat(out)  # (N,)


def _mean_nll(
    model: ARModel, data: Tensor, batch_size: int, device: torch.device, rank: int, world_size: int
) -> float:
    """Mean per-image NLL of ``data``; with several ranks each evaluates one shard and the sums are
    all-reduced, so every rank gets the same value (and makes the same early-stopping decisions)."""
    if world_size == 1:
        return evaluate_nll(model, data, batch_size, device).mean().item()
    shard = data.tensor_split(world_size)[rank]
    total = torch.zeros((), dtype=torch.float64, device=device)
    if len(shard):
        total += evaluate_nll(model, shard, batch_size, device).sum().to(device)
    dist.all_reduce(total)
    return total.item() / len(data)


def nats_to_bpd(nll: float, num_dims: int) -> float:
    return nll / (num_dims * math.log(2.0))


def _scheduler(
    opt: torch.optim.Optimizer, params: TrainParams, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    if params.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    if params.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=0.5, patience=max(0, params.patience // 2)
        )
    return None


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
) -> FitResult:
    """Train ``model`` in place and leave it holding the best validation weights.

    ``train`` is a fixed tensor of images or ``draw(epoch) -> images`` (fresh dynamic binarisation;
    it must be a function of ``epoch`` and the global torch RNG only). The best checkpoint is written
    atomically to ``checkpoint_path`` whenever validation improves.

    With ``resume_path``, the full training state is written there atomically after every epoch
    (including a copy of the best checkpoint, so it is self-contained), and a run started again resumes
    from it when it belongs to the same run: same architecture, config, train settings (except
    ``progress``/``num_samples``), ``checkpoint_extra``, initial weights, first-epoch training images
    and validation images. Otherwise it is ignored with a ``ResumeIgnoredWarning`` and training starts
    over. On resume ``checkpoint_path`` is rewritten if it does not hold the run's best epoch (a kill
    between the two writes, or a deleted file), and ``on_resume(history)`` is called with the restored
    epochs' records (``on_epoch`` is only called for epochs trained in this call). The resume file is
    left in place after a successful fit, marked finished: a rerun returns at once with the best
    weights (useful when the caller is killed after ``fit``). Delete it once the results are safely
    stored; the train stage does.

    Under ``torch.distributed`` (world size W > 1, e.g. after ``init_distributed()`` in a torchrun worker)
    every rank calls ``fit`` with the same arguments and data. Every rank draws the same permutation; each
    global batch ``perm[step*B:(step+1)*B]`` (B = ``batch_size``) is split into W contiguous shards (sizes
    differ by at most one) and rank r trains on shard r. DistributedDataParallel averages the W gradients,
    so each rank's mean loss is scaled by W * shard size / batch size: the update is the single-process
    update on the whole batch, uneven last batches included (a rank with an empty shard contributes a zero
    gradient). Only rank 0 reads and writes ``checkpoint_path`` and ``resume_path`` (the resume state is
    broadcast to the other ranks), calls ``on_epoch``/``on_resume`` and shows progress; at the end rank 0
    loads the best checkpoint and broadcasts its weights, so no shared filesystem is needed.
    """
    rank, world_size = rank_and_world_size()
    distributed, lead = world_size > 1, rank == 0
    torch.manual_seed(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    model.to(device)
    if params.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if params.compile and device.type == "cuda":
        model.compile()
    val = val.to(device)
    first = train(1) if callable(train) else train.to(device)
    n = min(len(first), params.max_train_images or len(first))
    steps = math.ceil(n / params.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    sched = _scheduler(opt, params, steps * params.epochs)
    use_amp = params.amp and device.type == "cuda"
    history: list[dict[str, float]] = []
    best_val, best_epoch, bad_epochs = math.inf, 0, 0
    best_ckpt: dict[str, Any] = {}  # the best checkpoint, kept (on the CPU) for the resume file
    train_seconds, seen, start = 0.0, 0, time.perf_counter()
    extra = {**(checkpoint_extra or {}), "train_params": dataclasses.asdict(params)}
    start_epoch, finished = 1, False
    identity = _run_identity(model, params, checkpoint_extra, first, val) if resume_path and lead else {}
    state = _resumable_state(resume_path, identity) if resume_path and lead else None
    if distributed and resume_path is not None:
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    if state is not None:
        best_ckpt = state["best_checkpoint"]
        if lead and not _holds_epoch(checkpoint_path, best_ckpt["epoch"], best_ckpt["val_nll"]):
            atomic_torch_save(best_ckpt, checkpoint_path)
        model.load_state_dict(state["model"])
        model.load_training_state(state["model_training_state"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and len(state["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history = state["history"]
        best_val, best_epoch, bad_epochs = state["best_val"], state["best_epoch"], state["bad_epochs"]
        train_seconds, seen = state["train_seconds"], state["seen"]
        start -= state["seconds"]  # the wall-clock budget (max_minutes) counts the earlier run(s) too
        start_epoch, finished = state["epoch"] + 1, state["finished"]
        if on_resume is not None and lead:
            on_resume(list(history))
    # Buffers are synced once, not before every step: no model keeps running statistics, and the ranks'
    # buffers (e.g. MADE's masks, switched by a step counter that advances identically everywhere) stay
    # equal. A static graph tolerates parameters no step uses (the last gated PixelCNN layer's h_out).
    trainer: nn.Module = _TrainingLoss(model)
    if distributed:
        trainer = DistributedDataParallel(trainer, forward_sync_buffers=False, static_graph=True)

    for epoch in range(start_epoch, params.epochs + 1):
        if finished:
            break
        data = first if epoch == 1 else (train(epoch) if callable(train) else first)
        perm = torch.randperm(len(data), generator=gen)[:n].to(device)
        trainer.train()
        total = torch.zeros((), device=device, dtype=torch.float64)
        t0 = time.perf_counter()
        bar = tqdm(
            range(steps),
            desc=f"{model.name} epoch {epoch}/{params.epochs}",
            disable=not (params.progress and lead),
            leave=False,
            mininterval=1.0,
        )
        for step in bar:
            batch = perm[step * params.batch_size : (step + 1) * params.batch_size]
            shard = batch.tensor_split(world_size)[rank] if distributed else batch
            # an empty shard (a last batch smaller than W) still joins the all-reduce, with weight 0
            xb = data[shard if len(shard) else batch[:1]]  # (B / W, C, H, W)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                shard_nll = trainer(xb)  # mean NLL over this rank's images
            loss = shard_nll * (world_size * len(shard) / len(batch)) if distributed else shard_nll
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if params.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            opt.step()
            if sched is not None and not isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step()  # per step (ReduceLROnPlateau subclasses LRScheduler but steps per epoch)
            if len(shard):
                total += shard_nll.detach().double() * len(shard)
            if step % 25 == 0 or step == steps - 1:
                done = total.clone()
                if distributed:  # every rank sees the same value and stops together if it is not finite
                    dist.all_reduce(done)
                running = done.item() / min(n, (step + 1) * params.batch_size)
                if not math.isfinite(running):
                    _diverged(model, epoch, step, running, checkpoint_path, best_epoch, best_val)
                bar.set_postfix(nll=f"{running:.2f}", bpd=f"{nats_to_bpd(running, model.num_dims):.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        seen += n
        train_nll = done.item() / n
        val_nll = _mean_nll(model, val, params.eval_batch_size, device, rank, world_size)
        if not math.isfinite(val_nll):
            _diverged(model, epoch, steps, val_nll, checkpoint_path, best_epoch, best_val)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(val_nll)
        record = {
            "epoch": float(epoch),
            "train_nll": train_nll,
            "val_nll": val_nll,
            "train_bpd": nats_to_bpd(train_nll, model.num_dims),
            "val_bpd": nats_to_bpd(val_nll, model.num_dims),
            "lr": opt.param_groups[0]["lr"],
            "epoch_seconds": epoch_seconds,
            "train_images_per_second": n / epoch_seconds,
        }
        history.append(record)
        if on_epoch is not None and lead:
            on_epoch(record)
        if params.progress and lead:
            tqdm.write(
                f"{model.name} epoch {epoch}: train {train_nll:.3f} nats, val {val_nll:.3f} nats "
                f"({record['val_bpd']:.4f} bpd), {record['train_images_per_second']:.0f} img/s"
            )
        if val_nll < best_val - 1e-6:
            best_val, best_epoch, bad_epochs = val_nll, epoch, 0
            if lead:
                best_ckpt = checkpoint_dict(model, epoch=epoch, val_nll=val_nll, **extra)
                if resume_path is not None:  # kept past this epoch: on the CPU .cpu() aliases the weights
                    best_ckpt["state_dict"] = {k: v.clone() for k, v in best_ckpt["state_dict"].items()}
                atomic_torch_save(best_ckpt, checkpoint_path)
        else:
            bad_epochs += 1
        # a wall-clock budget (max_minutes): convenient, but the stopping epoch then depends on the machine
        out_of_time = params.max_minutes is not None and time.perf_counter() - start > 60 * params.max_minutes
        if distributed and params.max_minutes is not None:  # rank 0's clock decides for all ranks
            flag = torch.tensor(float(out_of_time), device=device)
            dist.broadcast(flag, src=0)
            out_of_time = bool(flag.item())
        finished = bad_epochs >= params.patience or out_of_time or epoch == params.epochs
        if resume_path is not None and lead:
            atomic_torch_save(
                {
                    "format": RESUME_FORMAT,
                    "run": identity,
                    "epoch": epoch,
                    "finished": finished,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "model_training_state": model.training_state(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else {},
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                    "history": history,
                    "best_val": best_val,
                    "best_epoch": best_epoch,
                    "best_checkpoint": best_ckpt,
                    "bad_epochs": bad_epochs,
                    "train_seconds": train_seconds,
                    "seen": seen,
                    "seconds": time.perf_counter() - start,
                },
                resume_path,
            )

    if lead:
        model.load_state_dict(load_checkpoint(checkpoint_path)["state_dict"])
    if distributed:  # the other ranks get the best weights from rank 0, not from a (maybe unshared) disk
        for t in model.state_dict().values():
            buf = t.contiguous()
            dist.broadcast(buf, src=0)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)
    return FitResult(
        best_epoch=best_epoch,
        best_val_nll=best_val,
        history=history,
        seconds=time.perf_counter() - start,
        train_images_per_second=seen / max(train_seconds, 1e-9),
    )


def _digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of ``tensors`` (any device, any dtype)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _run_identity(
    model: ARModel, params: TrainParams, extra: dict[str, Any] | None, first: Tensor, val: Tensor
) -> dict[str, Any]:
    """What a resume file must match to continue this run (plain data, readable in a warning)."""
    train = dataclasses.asdict(params)
    return {
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


def _diverged(
    model: ARModel, epoch: int, step: int, value: float, ckpt: Path, best_epoch: int, best_val: float
) -> None:
    kept = (
        f"the last good checkpoint is kept at {ckpt} (epoch {best_epoch}, val NLL {best_val:.3f} nats)"
        if best_epoch
        else "no checkpoint was written yet (no epoch finished)"
    )
    raise NonFiniteLossError(
        f"{model.name}: the loss became {value} at epoch {epoch}, step {step}; training stopped and {kept}. "
        "Lower the learning rate (lr) or set grad_clip for this model in params.yaml."
    )
