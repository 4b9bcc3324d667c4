"""Training in several processes (torch.distributed, launched by torchrun) equals one process.

Two gloo ranks on the CPU train tiny models; the loss curves and final weights match a single-process
``fit`` on the same global batches, uneven last batches included, and only rank 0 writes files or logs.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from toys import row_copies

from ardetect.distributed import init_distributed, rank_and_world_size
from ardetect.models import build_model
from ardetect.training import TrainParams, fit

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")
PARAMS = TrainParams(
    batch_size=32,
    epochs=3,
    lr=0.01,
    lr_schedule="cosine",
    grad_clip=0.5,
    patience=100,
    eval_batch_size=64,
    progress=False,
    device="cpu",
)
# name -> (arch, hyperparameters, training images or None for a fresh draw per epoch, epochs)
CASES: dict[str, tuple[str, dict[str, Any], int | None, int]] = {
    # 203 images: the last global batch has 11 images, shards of 6 and 5; 2 masks cycled by a step counter;
    # fresh images every epoch drawn from the global RNG (which must stay in step on every rank)
    "made": ("made", {"hidden": [16], "num_masks": 2, "natural_ordering": False}, None, 3),
    # 65 fixed images: the last global batch has 1 image, so rank 1's shard is empty; the last layer's
    # horizontal output is an unused parameter
    "gated_pixelcnn": ("gated_pixelcnn", {"channels": 4, "layers": 3, "head_channels": 4}, 65, 2),
}
TIMING = {"epoch_seconds", "train_images_per_second"}


toy_data = row_copies  # binary 4x4 images whose rows copy their first pixel


PROBS = torch.rand(203, 1, 4, 4, generator=torch.Generator().manual_seed(5))


def draw(epoch: int) -> Tensor:  # dynamic binarisation from the global RNG
    return torch.bernoulli(PROBS)


def run_case(name: str, folder: Path, rank: int) -> dict[str, Any]:
    """One seeded fit of CASES[name]; what a rank (or the single process) ends with."""
    arch, hp, n, epochs = CASES[name]
    torch.manual_seed(0)
    model = build_model(arch, (1, 4, 4), **hp)
    records: list[dict[str, float]] = []
    result = fit(
        model,
        draw if n is None else toy_data(n, 0),
        toy_data(101, 1),  # 101 validation images: shards of 51 and 50
        dataclasses.replace(PARAMS, epochs=epochs),
        checkpoint_path=folder / f"{name}-best-rank{rank}.pt",
        resume_path=folder / f"{name}-last-rank{rank}.pt",
        device=CPU,
        on_epoch=records.append,
    )
    return {
        "history": result.history,
        "records": records,
        "state": model.state_dict(),
        "training_state": model.training_state(),
    }


SCRIPT = f"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)
sys.path.insert(0, {str(HERE)!r})
from test_distributed import CASES, run_case
from ardetect.distributed import init_distributed

out = Path(sys.argv[1])
rank, world_size = init_distributed()
assert world_size == 2 and dist.get_backend() == "gloo", (world_size, dist.get_backend())
for name in CASES:
    torch.save(run_case(name, out, rank), out / f"{{name}}-result-rank{{rank}}.pt")
dist.destroy_process_group()
"""


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs every case under ``torchrun --standalone --nproc_per_node 2`` (gloo on the CPU)."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "train_ddp.py"
    script.write_text(SCRIPT)
    # gloo on the CPU even on a GPU machine (init_distributed would pick GPU LOCAL_RANK and NCCL there)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, str(script), str(out)], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"torchrun with 2 ranks: {time.perf_counter() - t0:.1f} s")
    return out


@pytest.mark.slow  # torchrun with 2 ranks: about 20 s
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_train_like_one_process(name: str, two_ranks: Path, tmp_path: Path) -> None:
    single = run_case(name, tmp_path, 0)
    ranks = [torch.load(two_ranks / f"{name}-result-rank{r}.pt") for r in range(2)]
    lead, other = ranks

    epochs = CASES[name][3]
    assert [int(r["epoch"]) for r in lead["history"]] == list(range(1, epochs + 1))
    for got, want in zip(lead["history"], single["history"], strict=True):
        for key in ("train_nll", "val_nll", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["epoch"], key)
    # the weights in the end: the best epoch's, the same as one process's, on every rank
    assert lead["state"].keys() == single["state"].keys()
    for k, v in single["state"].items():
        torch.testing.assert_close(lead["state"][k], v, rtol=1e-5, atol=1e-5, msg=k)
        assert torch.equal(other["state"][k], lead["state"][k]), f"rank 1's {k} differs from rank 0's"
    assert lead["training_state"] == other["training_state"] == single["training_state"]
    # every rank agrees on the curve; only rank 0 saw on_epoch and wrote files
    assert without_timing(other["history"]) == without_timing(lead["history"])
    assert without_timing(lead["records"]) == without_timing(lead["history"]) and other["records"] == []
    written = sorted(p.name for p in two_ranks.glob(f"{name}-*") if "-result-" not in p.name)
    assert written == [f"{name}-best-rank0.pt", f"{name}-last-rank0.pt"]


@pytest.mark.slow
def test_made_masks_advance_once_per_global_step(two_ranks: Path) -> None:
    steps = 3 * 7  # 3 epochs of ceil(203 / 32) global batches, one mask switch each on every rank
    for r in range(2):
        state = torch.load(two_ranks / f"made-result-rank{r}.pt")["training_state"]
        assert state == {"train_steps": steps, "mask_index": (steps - 1) % 2}


def test_without_torchrun_training_stays_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == (0, 1)
    assert rank_and_world_size() == (0, 1)
    assert not torch.distributed.is_initialized()
