"""2-process CPU DDP job: every rank records the shared statistics and a float64 reference; rank 0 logs."""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradstab import GradNormMonitor
from lightning_gradstab.callbacks._shared import gradient_stats, logging_step
from lightning_gradstab.stats import group_name
from tests.conftest import MemoryLogger, reference_group_norms
from tests.helpers.models import TinyRegressor
from tests.helpers.trainers import quiet_trainer


class RankData(TinyRegressor):
    def train_dataloader(self):
        # different data per rank, so the all-reduced gradient differs from each local one
        generator = torch.Generator().manual_seed(100 + self.global_rank)
        x = torch.randn(48, 8, generator=generator)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


class Recorder(Callback):
    def __init__(self):
        self.rows = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        stats = gradient_stats(trainer, pl_module, optimizer)
        groups, total = reference_group_norms(pl_module, lambda n: group_name(n, "module"))
        self.rows.append({"step": logging_step(trainer), "shared": float(stats.total_norm), "reference": total,
                          "groups": groups})


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    torch.manual_seed(0)
    logger, recorder = MemoryLogger(), Recorder()
    trainer = quiet_trainer(
        devices=2, strategy="ddp", max_steps=4, log_every_n_steps=2, logger=logger,
        callbacks=[GradNormMonitor(log_every_n_steps=2), recorder],
    )
    trainer.fit(RankData())
    (out_dir / f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"rows": recorder.rows, "logged": {k: v for k, v in logger.metrics.items()}})
    )
