"""Maximum-likelihood training: one plain loop, minibatch Adam, early stopping on validation NLL.

The whole training set lives on the device as one tensor (no DataLoader): shuffling is an index
permutation, and dynamic binarisation draws a fresh binary copy of the gray levels each epoch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ardetect.models import ARModel, load_checkpoint, save_model
from ardetect.params import TrainParams


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the last good checkpoint."""


@dataclass(frozen=True)
class FitResult:
    best_epoch: int
    best_val_nll: float
    history: list[dict[str, float]]
    seconds: float
    train_images_per_second: float


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "train.defaults.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'"
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@torch.inference_mode()
def evaluate_nll(model: ARModel, data: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Per-image NLL in nats (float64, on the CPU), exact: no autocast at evaluation."""
    model.eval()
    out = [
        -model.log_prob(data[i : i + batch_size].to(device)).double().cpu()
        for i in range(0, len(data), batch_size)
    ]
    return torch.cat(out)  # (N,)


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
) -> FitResult:
    """Train ``model`` in place and leave it holding the best validation weights.

    ``train`` is a fixed tensor of images or ``draw(epoch) -> images`` (fresh dynamic binarisation).
    The best checkpoint is written atomically to ``checkpoint_path`` whenever validation improves.
    """
    torch.manual_seed(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    model.to(device)
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
    train_seconds, seen, start = 0.0, 0, time.perf_counter()
    extra = {**(checkpoint_extra or {}), "train_params": dataclasses.asdict(params)}

    for epoch in range(1, params.epochs + 1):
        data = first if epoch == 1 else (train(epoch) if callable(train) else first)
        perm = torch.randperm(len(data), generator=gen)[:n].to(device)
        model.train()
        total = torch.zeros((), device=device, dtype=torch.float64)
        t0 = time.perf_counter()
        bar = tqdm(
            range(steps),
            desc=f"{model.name} epoch {epoch}/{params.epochs}",
            disable=not params.progress,
            leave=False,
            mininterval=1.0,
        )
        for step in bar:
            xb = data[perm[step * params.batch_size : (step + 1) * params.batch_size]]  # (B, C, H, W)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = model.training_nll(xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if params.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            opt.step()
            if isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
                sched.step()
            total += loss.detach().double() * len(xb)
            if step % 25 == 0 or step == steps - 1:
                running = total.item() / min(n, (step + 1) * params.batch_size)
                if not math.isfinite(running):
                    _diverged(model, epoch, step, running, checkpoint_path, best_epoch, best_val)
                bar.set_postfix(nll=f"{running:.2f}", bpd=f"{nats_to_bpd(running, model.num_dims):.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        seen += n
        train_nll = total.item() / n
        val_nll = evaluate_nll(model, val, params.eval_batch_size, device).mean().item()
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
        if on_epoch is not None:
            on_epoch(record)
        if params.progress:
            tqdm.write(
                f"{model.name} epoch {epoch}: train {train_nll:.3f} nats, val {val_nll:.3f} nats "
                f"({record['val_bpd']:.4f} bpd), {record['train_images_per_second']:.0f} img/s"
            )
        if val_nll < best_val - 1e-6:
            best_val, best_epoch, bad_epochs = val_nll, epoch, 0
            save_model(model, checkpoint_path, epoch=epoch, val_nll=val_nll, **extra)
        else:
            bad_epochs += 1
            if bad_epochs >= params.patience:
                break
        if params.max_minutes is not None and time.perf_counter() - start > 60 * params.max_minutes:
            break  # a wall-clock budget: convenient, but the stopping epoch then depends on the machine

    model.load_state_dict(load_checkpoint(checkpoint_path)["state_dict"])
    return FitResult(
        best_epoch=best_epoch,
        best_val_nll=best_val,
        history=history,
        seconds=time.perf_counter() - start,
        train_images_per_second=seen / max(train_seconds, 1e-9),
    )


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
