"""Specification of the rollback check on real training: a divergence's rollback is undone when the snapshot's
weights score the new batches as badly as the diverged weights (the objective moved), and stands otherwise."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradstab import ExplosionGuard
from lightning_gradstab.guard.rollback_check import ROLLBACK_CHECK_STEPS


class HarderTargets(pl.LightningModule):
    """Regression whose targets grow 3x between steps ``start`` and ``start + 20`` (a curriculum's next stage: the
    objective moves for every weights alike), trained with SGD at a stable learning rate."""

    def __init__(self, start: int = 60) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.start = start

    def difficulty(self) -> float:
        return 1.0 + 2.0 * min(max(self.global_step - self.start, 0), 20) / 20

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), self.difficulty() * y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(4096, 8, generator=generator)
        y = torch.tanh(x @ torch.randn(8, 1, generator=generator))
        return DataLoader(TensorDataset(x, y), batch_size=32)


class WeightsBeforeEachStep(Callback):
    def __init__(self) -> None:
        self.weights: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.weights[trainer.global_step + 1] = [p.detach().clone() for p in pl_module.parameters()]


def _fit(tmp_path, module: pl.LightningModule, steps: int) -> tuple[ExplosionGuard, WeightsBeforeEachStep]:
    guard, recorder = ExplosionGuard(console_summary=False), WeightsBeforeEachStep()
    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[guard, recorder], default_root_dir=tmp_path,
    )
    trainer.fit(module)
    return guard, recorder


def test_a_curriculum_stage_is_not_rolled_back_its_weights_come_back_and_the_lr_is_untouched(tmp_path) -> None:
    guard, recorder = _fit(tmp_path, HarderTargets(), steps=160)
    policy = guard.policy(0)
    events = policy.events
    start = next(e for e in events if e["anomaly"] == "divergence")
    undo = next(e for e in events if e["rollback_check"] is not None)
    assert undo["rollback_check"]["verdict"] == "objective" and "undo_rollback" in undo["actions"]
    assert undo["step"] == start["step"] + ROLLBACK_CHECK_STEPS
    # after the undo the weights are exactly those of the divergence step (its own update skipped)
    after_undo = recorder.weights[undo["step"] + 1]
    at_divergence = recorder.weights[start["step"]]
    assert all(torch.equal(a, b) for a, b in zip(after_undo, at_divergence, strict=True))
    assert policy.lr_scale == 1.0 and policy.counts["objective_shift"] >= 1 and guard.stop_reason is None


def test_the_suite_releases_the_state_it_kept_aside_when_the_check_ends(tmp_path) -> None:
    guard, _ = _fit(tmp_path, HarderTargets(), steps=120)
    assert guard._snapshots.set_aside.location is None and guard._snapshots.set_aside.nbytes == 0
