"""The shared epoch loop (ardetect.loop) on a toy regression: early stopping in both directions, a
diverging loss, TrainState resuming bit for bit with a plain nn.Module, and the shard weights."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ardetect.distributed import Ranks
from ardetect.loop import EpochStats, NonFiniteLossError, Plan, Task, TrainState, train_epochs

CPU = torch.device("cpu")


class Regression(Task):
    """Least squares of a linear model on fixed data; the validation metric is scripted per epoch."""

    def __init__(self, model: nn.Module, metric: list[float] | None = None, nan_at_step: int = -1) -> None:
        g = torch.Generator().manual_seed(0)
        self.model, self.metric, self.nan_at_step, self.steps = model, metric, nan_at_step, 0
        self.x = torch.randn(40, 3, generator=g)  # (N, 3)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(40, generator=g)  # (N,)

    def draw(self, epoch: int) -> tuple[Tensor, Tensor]:
        return self.x, self.y

    def loss(self, *batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        xb, yb = batch
        self.steps += 1
        err = self.model(xb).squeeze(1) - yb  # (B,)
        loss = (err**2).mean() * (math.nan if self.steps == self.nan_at_step else 1.0)
        return loss, {"abs_error": err.detach().abs().sum().double()}

    def evaluate(self) -> dict[str, float]:
        if self.metric is None:
            with torch.no_grad():
                return {"val_mse": ((self.model(self.x).squeeze(1) - self.y) ** 2).mean().item()}
        return {"val_metric": self.metric.pop(0)}

    def record(self, stats: EpochStats) -> dict[str, float]:
        return {"epoch": float(stats.epoch), **stats.train, **stats.val}


def new_state(seed: int = 0, *, maximize: bool = False, dropout: float = 0.2) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(dropout), nn.Linear(8, 1))  # dropout: the global RNG
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
    best = -math.inf if maximize else math.inf
    return TrainState(model, opt, sched, torch.Generator().manual_seed(seed), CPU, best_value=best)


def plan(epochs: int = 10, patience: int = 2, monitor: str = "val_metric", **changes: Any) -> Plan:
    return Plan("toy", epochs, batch_size=16, patience=patience, monitor=monitor, progress=False, **changes)


@pytest.mark.parametrize(
    ("maximize", "metric", "best", "best_epoch", "epochs_run"),
    [
        # accuracy-like: best 0.7 at epoch 2; 0.6 and 0.65 do not beat it, so patience 2 stops after epoch 4
        (True, [0.5, 0.7, 0.6, 0.65, 0.9], 0.7, 2, 4),
        # NLL-like: 3.0 at epoch 3 beats 4.0; 3.5, 3.2 do not; stops after epoch 5
        (False, [5.0, 4.0, 3.0, 3.5, 3.2, 1.0], 3.0, 3, 5),
    ],
)
def test_early_stopping_follows_the_metric_direction(
    maximize: bool, metric: list[float], best: float, best_epoch: int, epochs_run: int
) -> None:
    state = new_state(maximize=maximize)
    improved = [
        int(r["epoch"])
        for r in train_epochs(state, Regression(state.model, metric), plan(maximize=maximize))
        if state.best_epoch == state.epoch
    ]
    assert len(state.history) == epochs_run and state.finished
    assert (state.best_epoch, state.best_value, improved[-1]) == (best_epoch, best, best_epoch)


def test_an_improvement_below_min_delta_does_not_count() -> None:
    state = new_state()
    list(train_epochs(state, Regression(state.model, [1.0, 0.95, 0.9, 0.5]), plan(min_delta=0.2)))
    assert (state.best_epoch, len(state.history)) == (1, 3)  # 0.95 and 0.9 are within 0.2 of 1.0


def test_epoch_means_are_over_the_images_not_the_batches() -> None:
    """40 images in batches of 16, 16, 8: the epoch's loss weights the last batch by its 8 images."""
    state = new_state(dropout=0.0)
    task = Regression(state.model, [1.0])
    losses: list[float] = []
    real_step = state.step

    def step(loss: Tensor, grad_clip: float | None) -> None:
        losses.append(loss.item())
        real_step(loss, grad_clip)

    state.step = step  # type: ignore[method-assign]
    (record,) = train_epochs(state, task, plan(epochs=1))
    assert len(losses) == 3
    assert record["loss"] == pytest.approx((16 * losses[0] + 16 * losses[1] + 8 * losses[2]) / 40, rel=1e-6)


def test_a_diverging_loss_stops_naming_the_step_and_the_hint() -> None:
    state = new_state()
    task = Regression(state.model, [1.0, 0.5, 0.4], nan_at_step=5)  # epoch 2 (3 steps an epoch), 2nd step
    message = r"toy: the loss became nan at epoch 2, step 2; .* the best epoch so far is 1\. Lower it\.$"
    with pytest.raises(NonFiniteLossError, match=message):
        list(train_epochs(state, task, plan(hint="Lower it.")))


def test_train_state_resumes_a_plain_module_bit_for_bit() -> None:
    """Three epochs straight equal two, a state_dict through torch.save(weights_only load), then one more
    on a fresh state: weights, Adam moments, schedule, permutation generator and dropout RNG all restored."""
    p = plan(epochs=3, monitor="val_mse", patience=10)
    ref = new_state()
    list(train_epochs(ref, Regression(ref.model), p))

    first = new_state()
    list(train_epochs(first, Regression(first.model), plan(epochs=2, monitor="val_mse", patience=10)))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(123)  # a different global RNG before the resume: load_state_dict must restore it
    resumed = new_state(seed=7)  # other initial weights and generator: all overwritten
    resumed.load_state_dict(saved)
    resumed.finished = False  # finished after its own last epoch (2 of 2); continue to 3
    list(train_epochs(resumed, Regression(resumed.model), p))

    assert resumed.epoch == ref.epoch == 3 and resumed.history == ref.history
    for k, v in ref.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert torch.equal(resumed.generator.get_state(), ref.generator.get_state())
    assert resumed.scheduler is not None and ref.scheduler is not None
    assert resumed.scheduler.state_dict() == ref.scheduler.state_dict()


def test_shards_weighted_by_their_share_give_the_whole_batch_mean() -> None:
    """What DistributedDataParallel averages over W ranks equals the mean over the whole batch, for
    uneven shards (11 images on 2 ranks: 6 and 5) and an empty one (1 image on 2 ranks)."""
    for size, world in ((11, 2), (1, 2), (10, 3)):
        batch = torch.arange(size)
        values = torch.linspace(0.0, 1.0, size, dtype=torch.float64) ** 2  # a per-image loss
        ranks = [Ranks(r, world) for r in range(world)]
        shards = [rk.shard(batch) for rk in ranks]
        assert torch.equal(torch.cat(shards), batch)
        weighted = [
            rk.scale(values[s].mean() if len(s) else torch.zeros((), dtype=torch.float64), len(s), size)
            for rk, s in zip(ranks, shards)
        ]
        assert (torch.stack(weighted).sum() / world).item() == pytest.approx(values.mean().item(), rel=1e-12)


def test_the_classifier_trains_through_the_loop_and_returns_its_best_epoch() -> None:
    """A learning rate high enough to make validation accuracy fall in the last epoch: the model returned
    is the best epoch's (its accuracy is the best recorded one), not the last epoch's."""
    from sklearn.datasets import load_digits

    from ardetect.classifier import ClassifierConfig, accuracy, train_classifier

    digits = load_digits()
    gray = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    y = digits.target
    xv, yv = gray[1200:1400], y[1200:1400]
    config = ClassifierConfig(
        channels=(4, 4), hidden=8, dropout=0.0, epochs=4, batch_size=32, lr=0.1, patience=10
    )
    model, history = train_classifier(gray[:300], y[:300], xv, yv, config, progress=False)
    val = [r["val_accuracy"] for r in history]
    assert len(val) == 4 and val[-1] < max(val), f"meant to cover a last epoch worse than the best: {val}"
    assert accuracy(model, xv, yv) == max(val)
    assert list(history[0]) == ["epoch", "train_loss", "train_accuracy", "val_accuracy", "seconds"]
    assert not model.training
