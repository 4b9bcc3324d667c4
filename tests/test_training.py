from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import Tensor
from toys import row_copies

from ardetect.data import TrainingData, first_eval_images
from ardetect.io import staged_outputs
from ardetect.models import build_model, load_model
from ardetect.models.fvsbn import FVSBN, FVSBNConfig
from ardetect.training import (
    DensityTraining,
    FitResult,
    NonFiniteLossError,
    TrainParams,
    evaluate_nll,
    fit,
    model_entry_of,
    nats_to_bpd,
)

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add sync cost
PARAMS = TrainParams(batch_size=32, epochs=6, lr=0.01, patience=10, progress=False, eval_batch_size=64)


toy_data = row_copies  # binary 4x4 images whose rows copy their first pixel


@pytest.mark.parametrize("name", ["fvsbn", "nade", "made"])
def test_training_lowers_validation_nll_and_checkpoint_reloads(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    hp = {"nade": {"hidden": 16}, "made": {"hidden": [32]}}.get(name, {})
    model = build_model(name, (1, 4, 4), **hp)
    train, val = toy_data(512, 0), toy_data(256, 1)
    before = evaluate_nll(model, val, 64, CPU).mean().item()
    result = fit(model, train, val, PARAMS, checkpoint_path=tmp_path / "best.pt", device=CPU)
    after = evaluate_nll(model, val, 64, CPU).mean().item()
    assert after < before - 1.0, (before, after)
    assert result.best_val_nll == pytest.approx(min(h["val_nll"] for h in result.history))
    assert result.history[-1]["val_bpd"] == pytest.approx(nats_to_bpd(result.history[-1]["val_nll"], 16))
    reloaded = load_model(tmp_path / "best.pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.log_prob(val), model.log_prob(val))


def test_training_is_deterministic_on_cpu(tmp_path: Path) -> None:
    weights = []
    for i in range(2):
        torch.manual_seed(0)
        model = build_model("nade", (1, 4, 4), hidden=8)
        fit(
            model,
            toy_data(256, 0),
            toy_data(64, 1),
            dataclasses.replace(PARAMS, epochs=2),
            checkpoint_path=tmp_path / f"{i}.pt",
            device=CPU,
        )
        weights.append(model.state_dict())
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_dynamic_resampling_is_called_per_epoch(tmp_path: Path) -> None:
    calls: list[int] = []

    def draw(epoch: int) -> Tensor:
        calls.append(epoch)
        return toy_data(128, epoch)

    fit(
        build_model("fvsbn", (1, 4, 4)),
        draw,
        toy_data(64, 99),
        dataclasses.replace(PARAMS, epochs=3),
        checkpoint_path=tmp_path / "b.pt",
        device=CPU,
    )
    assert calls == [1, 2, 3]


def test_early_stopping(tmp_path: Path) -> None:
    """Training on all-zero images makes all-one validation images ever less likely: stop after patience."""
    params = dataclasses.replace(PARAMS, epochs=50, patience=2, lr_schedule="constant")
    result = fit(
        build_model("fvsbn", (1, 4, 4)),
        torch.zeros(64, 1, 4, 4),
        torch.ones(16, 1, 4, 4),
        params,
        checkpoint_path=tmp_path / "b.pt",
        device=CPU,
    )
    assert result.best_epoch == 1
    assert len(result.history) == 3


class ExplodingFVSBN(FVSBN):
    """Returns a NaN loss from the 40th training step on (after the first epoch's checkpoint)."""

    steps = 0

    def training_nll(self, x: Tensor) -> Tensor:
        self.steps += 1
        loss = super().training_nll(x)
        return loss * float("nan") if self.steps >= 40 else loss


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = ExplodingFVSBN((1, 4, 4), FVSBNConfig())
    ckpt = tmp_path / "best.pt"
    with pytest.raises(NonFiniteLossError) as info:
        fit(
            model, toy_data(512, 0), toy_data(64, 1), PARAMS, checkpoint_path=ckpt, device=CPU
        )  # 16 steps/epoch
    msg = str(info.value)
    assert "loss became nan at epoch 3" in msg
    assert f"last good checkpoint is kept at {ckpt} (epoch 2" in msg
    assert "Lower the learning rate" in msg
    assert load_model(ckpt).log_prob(toy_data(8, 2)).isfinite().all()


def test_staged_outputs_appear_together_or_not_at_all(tmp_path: Path) -> None:
    a, b = tmp_path / "out" / "model", tmp_path / "metrics.json"
    b.write_text("stale")
    with pytest.raises(RuntimeError, match="boom"), staged_outputs(a, b) as (ta, tb):
        ta.mkdir()
        (ta / "w.pt").write_text("half")
        raise RuntimeError("boom")
    assert not a.exists() and not b.exists(), "a failed stage must not leave outputs that look complete"
    assert not list(tmp_path.rglob("*.partial"))
    with staged_outputs(a, b) as (ta, tb):
        ta.mkdir()
        (ta / "w.pt").write_text("ok")
        tb.write_text("{}")
    assert (a / "w.pt").read_text() == "ok" and b.read_text() == "{}"
    with pytest.raises(RuntimeError, match="without writing"), staged_outputs(a, b) as (ta, tb):
        tb.write_text("{}")
    assert not b.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_error_names_the_key_that_asked_for_cuda() -> None:
    from ardetect.devices import resolve_device

    assert resolve_device("auto", "attack.device") == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"attack.device is 'cuda' but no CUDA device is visible"):
        resolve_device("cuda", "attack.device")


def test_eval_images_cuts_val_and_test_and_the_test_nll_has_its_standard_error() -> None:
    """The CPU default evaluates the first ``eval_images`` of val and test; the reported test NLL is their
    mean, with its standard error and the count next to it."""
    torch.manual_seed(0)
    splits = {k: toy_data(n, seed) for seed, (k, n) in enumerate((("train", 40), ("val", 12), ("test", 10)))}
    labels = {k: torch.arange(len(v)) % 2 for k, v in splits.items()}
    data = TrainingData(splits["train"], splits["val"], splits["test"], (1, 4, 4), labels, 2)
    assert first_eval_images(data, None) is data
    cut = first_eval_images(data, 6)
    assert torch.equal(cut.val, splits["val"][:6]) and torch.equal(cut.test, splits["test"][:6])
    for split in ("val", "test"):
        assert torch.equal(cut.labels[split], labels[split][:6])
    assert cut.train is data.train  # training is untouched
    assert torch.equal(cut.labels["train"], labels["train"])

    model = build_model("fvsbn", (1, 4, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # images of unequal likelihood: a non-zero standard error
    params = dataclasses.replace(PARAMS, eval_images=6)
    job = DensityTraining("fvsbn", model_entry_of({"arch": "fvsbn"}), params, model, cut, cut.train, CPU)
    metrics = job.metrics(FitResult(1, 0.0, [], 1.0, 1.0))
    per_image = evaluate_nll(model, splits["test"][:6], 64, CPU)
    assert metrics["test_images"] == 6
    assert metrics["test_nll"] == pytest.approx(per_image.mean().item())
    se = per_image.std().item() / 6**0.5
    assert se > 0 and metrics["test_bpd_se"] == pytest.approx(nats_to_bpd(se, 16))
