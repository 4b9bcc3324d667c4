"""Several processes sharing one stage (``torchrun``): joining the group, sharding, summing, broadcasting,
gathering.

Training: every rank holds the same data and draws the same permutation; each global batch is split into
one contiguous shard per rank, and sums (losses, validation NLL) are all-reduced, so every rank sees the
same numbers and takes the same decisions. Evaluation (attack, score, purify): every rank holds the same
inputs, computes one contiguous range of them in whole batches (:meth:`Ranks.shard_range`), and the parts
are joined in rank order on every rank (:meth:`Ranks.gather_rows`), so the result is the one process's.
Without torchrun everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


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


@dataclass(frozen=True)
class Ranks:
    """Rank ``rank`` of ``world_size`` processes training one model; ``Ranks()`` is one plain process."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """This process's place in the initialised process group, or one plain process."""
        return cls(*rank_and_world_size())

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def lead(self) -> bool:
        """Rank 0: the one process that reads and writes files, logs and prints."""
        return self.rank == 0

    def shard(self, batch: Tensor) -> Tensor:
        """This rank's contiguous part of ``batch`` (sizes differ by at most one; may be empty)."""
        return batch.tensor_split(self.world_size)[self.rank] if self.distributed else batch

    def shard_range(self, n: int, block: int = 1) -> range:
        """This rank's contiguous part of ``range(n)``, cut only between whole blocks of ``block`` items
        (only the last block of all may be short). Ranks get numbers of blocks that differ by at most one,
        the larger ones first, as :meth:`shard`'s ``tensor_split``; a rank may get none (an empty range).
        With batches as blocks, every batch a rank computes is one that a single process computes.
        ``range(n)`` for one process."""
        if block < 1:
            raise ValueError(f"block must be at least 1, got {block}")
        if not self.distributed:
            return range(n)
        per, extra = divmod(-(-n // block), self.world_size)  # blocks per rank; `extra` ranks get one more
        first = self.rank * per + min(self.rank, extra)
        last = first + per + (self.rank < extra)
        return range(min(n, first * block), min(n, last * block))

    def gather(self, obj: T) -> list[T]:
        """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` for one process).
        Objects travel pickled through the CPU (gloo) group: keep tensors in them on the CPU."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_rows(self, part: T) -> T:
        """This rank's rows ``part`` joined with every other rank's in rank order (:func:`concat_rows`),
        the same on every rank: the whole result when each rank computed its :meth:`shard_range`.
        ``part`` itself, untouched, for one process."""
        return concat_rows(self.gather(part)) if self.distributed else part

    def scale(self, loss: Tensor, shard_size: int, batch_size: int) -> Tensor:
        """Weight a shard's mean loss by its share of the batch. DistributedDataParallel averages the W
        gradients, so the update equals one process's on the whole batch, uneven batches included."""
        return loss * (self.world_size * shard_size / batch_size) if self.distributed else loss

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks, in place (every rank gets the total)."""
        if self.distributed:
            dist.all_reduce(t)
        return t

    def from_lead(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object, e.g. a resume state read from disk)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def flag_from_lead(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's ``flag`` on every rank (e.g. rank 0's clock deciding a time budget for all)."""
        if not self.distributed:
            return flag
        t = torch.tensor(float(flag), device=device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def weights_from_lead(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into ``module`` on every rank (no shared disk needed)."""
        if not self.distributed:
            return
        for t in module.state_dict().values():
            buf = t.contiguous()
            dist.broadcast(buf, src=0)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel (gradients all-reduced in backward), or as it is.

        Buffers are synced once, at wrapping, not before every step: no model here keeps running
        statistics, and the ranks' buffers (e.g. MADE's masks, switched by a step counter that advances
        identically everywhere) stay equal. A static graph tolerates parameters no step uses (the last
        gated PixelCNN layer's h_out).
        """
        if not self.distributed:
            return module
        return DistributedDataParallel(module, forward_sync_buffers=False, static_graph=True)


def concat_rows(parts: Sequence[Any]) -> Any:
    """Per-rank parts joined in rank order: NumPy arrays and tensors along their first axis, lists end
    to end, tuples and dicts item by item (each item joined the same way)."""
    first = parts[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    if isinstance(first, Tensor):
        return torch.cat(list(parts))
    if isinstance(first, list):
        return [row for part in parts for row in part]
    if isinstance(first, tuple):
        return tuple(concat_rows(items) for items in zip(*parts, strict=True))
    if isinstance(first, dict):
        return {k: concat_rows([part[k] for part in parts]) for k in first}
    raise TypeError(f"cannot join per-rank parts of type {type(first).__name__}")


def on_lead(context: AbstractContextManager[T]) -> AbstractContextManager[T | None]:
    """``context`` on rank 0; on the other ranks a block that yields None and enters nothing (e.g. a
    stage's MLflow run: only rank 0 opens it; ``context`` must do nothing until entered)."""
    return context if Ranks.current().lead else nullcontext()


@contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """:func:`init_distributed` for a ``with`` block: yields (rank, world size) and leaves the process
    group on the way out (also on errors), so a torchrun worker exits cleanly."""
    rank, world_size = init_distributed()  # (0, 1) without torchrun
    try:
        yield rank, world_size
    finally:
        if world_size > 1:
            dist.destroy_process_group()
