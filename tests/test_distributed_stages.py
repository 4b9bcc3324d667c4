"""Attack, score and purify in several processes (torch.distributed, launched by torchrun) equal one process.

Two gloo ranks on the CPU run the library functions (``run_attacks``, ``score_table``, ``run_purify``) on
tiny models and a handful of 8x8 digits in small batches, so that the ranks' shares differ in size (5
images in batches of 2: two batches and one); every rank ends with exactly what one process computes,
bit for bit. Then the stage scripts themselves run under torchrun, each rank in its own copy of a tiny
project: rank 0 writes the same files as one process and opens the only MLflow run; rank 1 writes nothing
and prints nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from toys import TINY, digits_gray, randomize, tiny_model

from ardetect.attacks import AttackConfig, AttackResult, rng_state, run_attacks, skip_random_draws
from ardetect.classifier import ClassifierConfig, SmallCNN, save_classifier, seeded, train_classifier
from ardetect.data import save_split
from ardetect.distributed import Ranks, concat_rows
from ardetect.models import build_model, save_model
from ardetect.purify import PurifyParams, PurifyRun, run_purify
from ardetect.scoring import ImageSet, ScoreConfig, score_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHAPE = (1, 8, 8)
pytestmark = pytest.mark.usefixtures("one_thread")  # the ranks run one thread each: the same arithmetic


# ---------------------------------------------------------------------------------------------------
# the pieces, without processes


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_shard_range_cuts_whole_blocks_in_rank_order(world_size: int, block: int) -> None:
    for n in range(12):
        shares = [Ranks(r, world_size).shard_range(n, block) for r in range(world_size)]
        assert [i for s in shares for i in s] == list(range(n))  # contiguous, in rank order, all of them
        assert all(s.start % block == 0 for s in shares if s)  # whole blocks (the last may be short)
        blocks = [-(-len(s) // block) for s in shares]
        assert max(blocks) - min(blocks) <= 1 and blocks == sorted(blocks, reverse=True)
        if block == 1:  # the same split as Ranks.shard's tensor_split
            want = [len(t) for t in torch.arange(n).tensor_split(world_size)]
            assert [len(s) for s in shares] == want


def test_concat_rows_joins_in_rank_order() -> None:
    parts = [
        (np.arange(3), [1, 2], {"a": torch.zeros(2)}),
        (np.arange(0), [], {"a": torch.ones(1)}),
        (np.arange(2), [3], {"a": torch.zeros(0)}),
    ]
    arrays, rows, tensors = concat_rows(parts)
    assert np.array_equal(arrays, [0, 1, 2, 0, 1]) and rows == [1, 2, 3]
    assert torch.equal(tensors["a"], torch.tensor([0.0, 0.0, 1.0]))
    assert Ranks().gather_rows(parts[0]) is parts[0]  # one process: untouched
    assert Ranks().shard_range(7, 3) == range(7)
    with pytest.raises(TypeError, match="set"):
        concat_rows([{1}, {2}])


def test_skipping_draws_lands_where_the_attack_left_the_stream() -> None:
    """What a rank does before its first batch: the RNG ends where one process's attacks left it."""
    import foolbox as fb

    from ardetect.attacks import build_attack

    x, y = torch.as_tensor(DIGITS[0][:4]).float() / 255, torch.as_tensor(DIGITS[1][:4])
    config = AttackConfig(attacks=("pgd", "noise"), epsilons=(0.1, 0.3), pgd_steps=1, batch_size=2)
    fmodel = fb.PyTorchModel(classifier(), bounds=(0.0, 1.0))
    for name in config.attacks:
        with seeded(0):
            for i in range(0, 4, 2):  # the first two batches
                build_attack(name, config)(fmodel, x[i : i + 2], y[i : i + 2], epsilons=config.epsilons)
            attacked = rng_state(torch.device("cpu"))
        with seeded(0):
            skip_random_draws(len(config.epsilons), 4, 2, SHAPE, "cpu")
            skipped = rng_state(torch.device("cpu"))
        assert torch.equal(attacked, skipped), name


# ---------------------------------------------------------------------------------------------------
# the library functions, as every rank (and one process) calls them

DIGITS = digits_gray()  # (1797, 1, 8, 8) uint8, labels


def classifier(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(SHAPE, ClassifierConfig(channels=(4, 8), hidden=16, dropout=0.0)).eval()


def attack_case() -> list[AttackResult]:
    """Every attack on 5 images in batches of 2 (PGD and the noise draw from the stream across batches)."""
    images, labels = DIGITS[0][:5], DIGITS[1][:5]
    config = AttackConfig(
        epsilons=(0.1, 0.3),
        pgd_steps=3,
        deepfool_steps=3,
        cw_steps=3,
        cw_binary_search_steps=2,
        cw_initial_const=1.0,
        batch_size=2,
    )
    return run_attacks(classifier(), images, labels, config, progress=False)


def score_models() -> dict[str, Any]:
    torch.manual_seed(1)
    cond = build_model("pixelcnn", SHAPE, levels=256, num_classes=10, **TINY["pixelcnn"].hparams)
    randomize(cond)
    return {
        "made": (tiny_model("made", SHAPE), "dynamic"),  # seeded draws per (global) row
        "fvsbn": (tiny_model("fvsbn", SHAPE), "static"),
        "pixelcnn_8bit": (tiny_model("pixelcnn", SHAPE, levels=256), None),
        "cond": (cond.eval(), None),  # three scores per image; one image per batch of 4 rows
    }


def score_case() -> tuple[Any, dict[str, float]]:
    """Four models on sets of 5, 3, 0 and 7 images: batches of 2 (dynamic), 4 (static, 8-bit), 1 (cond)."""
    images, labels = DIGITS[0][:15], DIGITS[1][:15]
    pred = (labels + 1) % 10
    sets = [
        ImageSet("train_ref", images[:5], np.arange(5), labels[:5], labels[:5]),
        ImageSet("test", images[5:8], np.arange(5, 8), labels[5:8], pred[5:8]),
        ImageSet("calib", images[:0], np.arange(0), labels[:0], labels[:0]),
        ImageSet("adversarial", images[8:], np.arange(7), labels[8:], pred[8:], "pgd", 0.1, pred[8:] != 0),
    ]
    config = ScoreConfig(num_draws=2, seed=3, batch_size=4)
    return score_table(score_models(), sets, config, progress=False, threshold=0.4)


def purify_case() -> PurifyRun:
    """Purification of a stream of 12 images in batches of 2, and BPDA PGD on 5 (three batches)."""
    torch.manual_seed(2)
    hp = {"channels": 8, "blocks": 2, "kernel_size": 5, "block_kernel_size": 3, "head_channels": 8}
    density = build_model("pixelcnn", SHAPE, levels=256, **hp).eval()  # reach 4 rows: crops happen
    with torch.no_grad():
        for p in density.parameters():
            p.mul_(3.0)
    images, labels = DIGITS[0][20:32], DIGITS[1][20:32]
    sets = {
        "clean": (images[:5], labels[:5]),
        "pgd_e8": (images[5:8], labels[5:8]),
        "cw": (images[8:], labels[8:]),
    }
    params = PurifyParams(eps_defend=(8, 32), batch_size=2, bpda_steps=2, bpda_images=5, progress=False)
    return run_purify(classifier(1), density, sets, params)


CASES = {"attack": attack_case, "score": score_case, "purify": purify_case}

SCRIPT = f"""
import os, pickle, sys, time
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True, warn_only=True)
sys.path.insert(0, {str(HERE)!r})
from test_distributed_stages import CASES
from ardetect.distributed import init_distributed

out = Path(sys.argv[1])
rank, world_size = init_distributed()
assert world_size == 2 and dist.get_backend() == "gloo", (world_size, dist.get_backend())
os.chdir(out / f"cwd{{rank}}")  # where a stray write would land
for name, case in CASES.items():
    t0 = time.perf_counter()
    result = case()
    seconds = time.perf_counter() - t0
    (out / f"{{name}}-rank{{rank}}.pkl").write_bytes(pickle.dumps((result, seconds)))
dist.destroy_process_group()
"""


def torchrun_env() -> dict[str, str]:
    """gloo on the CPU even on a GPU machine (init_distributed would pick GPU LOCAL_RANK and NCCL there)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ARDETECT_PIPELINE_ID": "test"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    return env


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case under ``torchrun --standalone --nproc_per_node 2`` (gloo on the CPU)."""
    out = tmp_path_factory.mktemp("ranks")
    (out / "cwd0").mkdir()
    (out / "cwd1").mkdir()
    script = out / "cases.py"
    script.write_text(SCRIPT)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*TORCHRUN, str(script), str(out)], capture_output=True, text=True, env=torchrun_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    seconds = {n: pickle.loads((out / f"{n}-rank0.pkl").read_bytes())[1] for n in CASES}
    print(f"torchrun with 2 ranks: {time.perf_counter() - t0:.1f} s; cases: {seconds}")
    return out


def rank_results(folder: Path, name: str) -> list[Any]:
    return [pickle.loads((folder / f"{name}-rank{r}.pkl").read_bytes())[0] for r in range(2)]


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Equal to the bit: arrays by ``array_equal`` (dtype too), data frames exactly, dataclasses field by
    field but timings (``seconds*``)."""
    if dataclasses.is_dataclass(want) and not isinstance(want, type):
        assert type(got) is type(want), where
        for f in dataclasses.fields(want):
            if not f.name.startswith("seconds"):
                assert_same(getattr(got, f.name), getattr(want, f.name), f"{where}.{f.name}")
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=want.dtype.kind == "f"), where
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


@pytest.mark.slow  # torchrun with 2 ranks: about 10 s on 2 idle cores
def test_two_ranks_attack_like_one_process(two_ranks: Path) -> None:
    single = attack_case()
    for rank, got in enumerate(rank_results(two_ranks, "attack")):
        assert_same(got, single, f"rank {rank}")
    # the attacks did something: not every adversarial is its original
    assert any(not np.array_equal(r.adversarial, single[0].adversarial) for r in single[1:])


@pytest.mark.slow
def test_two_ranks_score_like_one_process(two_ranks: Path) -> None:
    import pandas as pd

    table, speed = score_case()
    cond = {"cond", "cond-pred", "cond-disagree", "cond-surprise"}
    assert set(table["model"]) == {"made", "fvsbn", "pixelcnn_8bit", *cond}
    assert (table.query("model == 'made'")["bpd_se"] > 0).all()  # dynamic: draws per row
    for got_table, got_speed in rank_results(two_ranks, "score"):
        pd.testing.assert_frame_equal(got_table, table, check_exact=True)
        assert got_table.equals(table) and list(got_speed) == list(speed)


@pytest.mark.slow
def test_two_ranks_purify_like_one_process(two_ranks: Path) -> None:
    single = purify_case()
    assert single.stats.images == 2 * (12 + 5)  # per ε_defend: the stream and the BPDA set
    for rank, got in enumerate(rank_results(two_ranks, "purify")):
        assert_same(got, single, f"rank {rank}")  # purified images, predictions, decoding work
    assert any(not np.array_equal(r.purified, r.images) for r in single.results)


@pytest.mark.slow
def test_library_functions_write_nothing(two_ranks: Path) -> None:
    assert list((two_ranks / "cwd0").iterdir()) == list((two_ranks / "cwd1").iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# the stage scripts: rank 0 alone writes, logs and prints

WRAPPER = """
import os, runpy, sys

os.chdir(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]))  # each rank in its own copy
sys.argv = [sys.argv[2]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
STAGES = {  # stage -> its outputs, and what it prints
    "attack": (["data/attacks", "data/metrics/attack.json"], "success_after_rounding"),
    "score": (["data/scores", "data/metrics/score.json"], "(model, image) pairs"),
    "purify": (["data/purify", "data/metrics/purify.json"], "passes in"),
}
TIMINGS = {"seconds_per_image", "images_per_second"}


def tiny_project(folder: Path) -> None:
    """params.yaml, the dataset (digits), a classifier and three density models: the stages' inputs."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["attack"].update(
        num_images=5, batch_size=2, pgd_steps=3, deepfool_steps=3, cw_steps=3, cw_binary_search_steps=1
    )
    params["score"].update(num_draws=2, batch_size=4, num_test=6, num_calib=6, num_train_ref=7)
    params["purify"].update(num_images=5, eps_defend=[16], batch_size=4, bpda_images=5, bpda_steps=2)
    for section in ("attack", "score", "purify"):
        params[section].update(device="cpu", progress=False)
    params["train"]["models"] = ["fvsbn", "pixelcnn_8bit", "pixelcnn_8bit_cond"]
    pixelcnn = {"arch": "pixelcnn", "levels": 256, "hparams": TINY["pixelcnn"].hparams}
    params["models"] = {
        "fvsbn": {"arch": "fvsbn"},
        "pixelcnn_8bit": pixelcnn,
        "pixelcnn_8bit_cond": {**pixelcnn, "conditional": True},
    }
    params["tracking"].update(uri=None, log_models=False)
    (folder / "data").mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    gray, labels = DIGITS
    for split, rows in {"train": slice(0, 1200), "val": slice(1200, 1400), "test": slice(1400, None)}.items():
        save_split(folder / "data/dataset" / f"{split}.npz", images=gray[rows], labels=labels[rows])
    config = ClassifierConfig(channels=(4, 8), hidden=16, dropout=0.0, epochs=3, batch_size=64, lr=5e-3)
    clf, _ = train_classifier(
        gray[:1200], labels[:1200], gray[1200:1400], labels[1200:1400], config, progress=False
    )
    (folder / "data/classifier").mkdir()
    save_classifier(clf, folder / "data/classifier/model.pt")
    torch.manual_seed(0)
    for name, entry in params["models"].items():
        if entry.get("conditional"):
            model = build_model("pixelcnn", SHAPE, levels=256, num_classes=10, **entry["hparams"])
            randomize(model)
        else:
            model = tiny_model(entry["arch"], SHAPE, entry.get("levels", 2))
        (folder / "data/models" / name).mkdir(parents=True)
        save_model(model, folder / "data/models" / name / "model.pt")


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each stage once as one process (in ``single``) and once under torchrun (``<stage>/rank<r>``, copies
    of ``single`` as the stage found it); what each wrote and printed."""
    base = tmp_path_factory.mktemp("stages")
    single = base / "single"
    tiny_project(single)
    (base / "wrapper.py").write_text(WRAPPER)
    env, runs = torchrun_env(), {}
    for stage in STAGES:
        script = str(ROOT / "pipeline" / f"{stage}.py")
        for r in range(2):
            shutil.copytree(single / "data", base / stage / f"rank{r}" / "data")
            shutil.copy2(single / "params.yaml", base / stage / f"rank{r}")
        before = [files(base / stage / f"rank{r}") for r in range(2)]
        t0 = time.perf_counter()
        one = subprocess.run([sys.executable, script], cwd=single, capture_output=True, text=True, env=env)
        assert one.returncode == 0, one.stderr[-4000:]
        t1 = time.perf_counter()
        logs = base / "logs" / stage  # each rank's stdout in <run>/attempt_0/<rank>/stdout.log
        cmd = [
            *TORCHRUN,
            "--log-dir",
            str(logs),
            "--tee",
            "1",
            str(base / "wrapper.py"),
            str(base / stage),
            script,
        ]
        two = subprocess.run(cmd, cwd=base, capture_output=True, text=True, env=env, timeout=300)
        assert two.returncode == 0, two.stderr[-4000:]
        printed = [next(logs.glob(f"*/attempt_0/{r}/stdout.log")).read_text() for r in range(2)]
        print(f"{stage}: one process {t1 - t0:.1f} s, torchrun with 2 ranks {time.perf_counter() - t1:.1f} s")
        after = [files(base / stage / f"rank{r}") for r in range(2)]
        runs[stage] = {
            "single": files(single),
            "before": before,
            "after": after,
            "printed": printed,
            "lead_dir": base / stage / "rank0",
        }
    return runs


def without_timing(metrics: bytes) -> Any:
    return {s: {k: v for k, v in m.items() if k not in TIMINGS} for s, m in json.loads(metrics).items()}


@pytest.mark.slow  # three stages, each as one process and under torchrun: about 60 s on 2 idle cores
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_under_torchrun_writes_one_process_outputs_from_rank0_only(
    stage: str, stage_runs: dict[str, dict[str, Any]]
) -> None:
    run = stage_runs[stage]
    outputs, printed = STAGES[stage]
    lead, other = run["after"]
    new = sorted(set(lead) - set(run["before"][0]))
    assert new and all(p.startswith((*outputs, "mlflow.db", "mlartifacts/")) for p in new), new
    for path in (p for p in new if p.startswith(tuple(outputs))):
        if path.endswith(".json"):  # wall time differs; every other number is the same
            assert without_timing(lead[path]) == without_timing(run["single"][path]), path
        else:
            assert lead[path] == run["single"][path], f"{path} differs from one process's"
    assert other == run["before"][1], "rank 1 wrote or changed files"
    assert printed in run["printed"][0] and run["printed"][1] == "", run["printed"]  # rank 0 alone prints
    with sqlite3.connect(run["lead_dir"] / "mlflow.db") as con:  # rank 0's store: one run of the stage
        statuses = con.execute("SELECT status FROM runs WHERE name = ?", (stage,)).fetchall()
    assert statuses == [("FINISHED",)]
