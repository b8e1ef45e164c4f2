"""2-process CPU DDP job: each rank trains on its one batch again and again (``overfit_batches=1``), and rank 1's
loss is 1e4 times larger on three consecutive steps: a loss spike whose batch comes back unchanged after its skip.

Usage: ``python guard_repeat_ddp.py OUT_DIR``; each rank writes ``OUT_DIR/rank{N}.json`` with its guard's events and
counts and the weights after every step, so the test can check that both ranks judged the repeat alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_gradstab.callbacks.guard import ExplosionGuard
from tests.helpers.trainers import quiet_trainer
from tests.scripts.guard_models import WeightsByStep, regression_loader, write_rank_result

SPIKE_STEPS = range(40, 43)  # rank 1's loss x 1e4: the step is skipped, then the same batch on the same weights
STEPS = 60


class OverfitOneBatch(pl.LightningModule):
    """8-16-1 tanh regressor under SGD whose loss on rank ``spike_rank`` (every rank: ``None``) is 1e4 times larger at
    ``SPIKE_STEPS``; also the single-process model of ``tests/test_guard.py``'s repeated-batch test."""

    def __init__(self, spike_rank: int | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.spike_rank = spike_rank

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        spiking = self.spike_rank in (None, self.global_rank) and self.global_step in SPIKE_STEPS
        return loss * 1e4 if spiking else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = OverfitOneBatch(spike_rank=1)
    guard = ExplosionGuard(console_summary=False)
    weights = WeightsByStep()
    trainer = quiet_trainer(
        devices=2, strategy="ddp", max_steps=STEPS, overfit_batches=1, callbacks=[guard, weights],
        default_root_dir=str(out_dir),
    )
    trainer.fit(model, regression_loader())
    write_rank_result(out_dir, trainer, guard, weights)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
