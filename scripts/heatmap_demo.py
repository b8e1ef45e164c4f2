"""A run for the heat-map screenshot: one dead layer (a residual branch whose ReLU never fires) and one NaN step.

``python scripts/heatmap_demo.py LOGDIR``: a 10-block residual MLP on the 8x8 digits, 150 SGD steps. Block 4's
bias starts at -50, so its ReLU outputs zero for every input and its weights get exactly zero gradient (a dead
layer: the grey row); at step 60 the loss is multiplied by NaN (every layer's gradient is NaN: the red column),
and ``ExplosionGuard`` skips that step, so training goes on. TensorBoard logs go to ``LOGDIR/heatmap``.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradstab import ExplosionGuard, GradNormMonitor

NAN_STEP, DEAD_BLOCK = 60, 4


class ResidualNet(pl.LightningModule):
    def __init__(self, blocks: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, 10)
        with torch.no_grad():
            self.blocks[DEAD_BLOCK].bias.fill_(-50.0)  # ReLU(Wx - 50) = 0 for every input: a dead branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + torch.relu(block(h))
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.global_step == NAN_STEP:
            loss = loss * float("nan")  # a corrupt batch: every gradient of this step is NaN
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def main(log_dir: str) -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    loader = DataLoader(TensorDataset(x, torch.tensor(digits.target)), batch_size=64, shuffle=True)
    trainer = pl.Trainer(
        max_steps=150,
        logger=TensorBoardLogger(log_dir, name="heatmap", version=""),
        callbacks=[GradNormMonitor(heatmap_every_n_steps=50), ExplosionGuard()],
        log_every_n_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(ResidualNet(), loader)


if __name__ == "__main__":
    main(sys.argv[1])
