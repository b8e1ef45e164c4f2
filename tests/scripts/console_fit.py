"""A tiny fit with the whole suite and a chosen progress bar, for tests/test_console.py's pseudo-terminal.

``python console_fit.py rich,tqdm OUT_DIR``: one fit per named progress bar, each after a line
``=== <bar> progress bar ===``. Each is a 30-layer Xavier ReLU MLP on random 10-class data (it stalls, so
the audit and the advisor have findings to print), 12 steps, validation every epoch (a second progress bar).
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradstab import ArchitectureAdvisor, ExplosionGuard, GradNormMonitor, InitAudit


class StalledMLP(pl.LightningModule):
    def __init__(self, depth: int = 30, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(depth):
            linear = nn.Linear(16 if index == 0 else width, 10 if index == depth - 1 else width)
            nn.init.xavier_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU()] if index < depth - 1 else [linear]
        self.network = nn.Sequential(*layers)

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self.network(inputs), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        self.log("val/loss", nn.functional.cross_entropy(self.network(inputs), labels), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.003, momentum=0.9)


def loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(96, 16, generator=generator)
    return DataLoader(TensorDataset(inputs, torch.randint(0, 10, (96,), generator=generator)), batch_size=16)


def fit(bar_name: str, out_dir: str) -> None:
    torch.manual_seed(0)
    bar = RichProgressBar() if bar_name == "rich" else TQDMProgressBar()
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[GradNormMonitor(), ExplosionGuard(), InitAudit(), ArchitectureAdvisor(observe_steps=10), bar],
        default_root_dir=out_dir,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=2,
    )
    trainer.fit(StalledMLP(), loader(0), loader(1))


if __name__ == "__main__":
    # one process for both bars: the interpreter and torch start once (the test's time is mostly start-up)
    for name in sys.argv[1].split(","):
        print(f"=== {name} progress bar ===", flush=True)
        fit(name, f"{sys.argv[2]}/{name}")
