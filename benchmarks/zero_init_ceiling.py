"""Does the relative-update ceiling slow a deliberately zero-initialised model? (a held-out healthy shape)

A residual MLP whose residual branches end in a zero matrix (Fixup / SkipInit style, Zhang et al. 2019, De & Smith
2020) and whose readout is zero (muP style), AdamW at 1e-3 and 3e-3, 300 steps, 3 seeds, the default guard with the
ceiling on and off. A zero matrix's step is measured against a variance-preserving init's scale, 1/sqrt(fan_in):
this measures whether the ceiling still holds such matrices back (with Adafactor's absolute floor of 1e-3, the
first version, it bounded their first 34-59 steps).

Usage::

    python benchmarks/zero_init_ceiling.py --output benchmarks/results/zero-init-ceiling-cpu.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks.harness import write_results
from lightning_gradstab import ExplosionGuard
from tests.helpers.trainers import quiet_trainer


class ZeroInitResidualMLP(pl.LightningModule):
    """6 residual blocks whose last layer starts at zero, a zero readout, on a fixed 10-class task."""

    def __init__(self, seed: int, lr: float) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(32, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)) for _ in range(6))
        for block in self.blocks:
            nn.init.zeros_(block[2].weight)
            nn.init.zeros_(block[2].bias)
        self.out = nn.Linear(64, 10)
        nn.init.zeros_(self.out.weight)
        self.lr = lr
        g = torch.Generator().manual_seed(100)
        self.x = torch.randn(2048, 32, generator=g)
        self.y = (torch.tanh(self.x @ torch.randn(32, 10, generator=g)) @ torch.randn(10, 10, generator=g)).argmax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def run(seed: int, lr: float, ceiling: bool) -> tuple[float, int]:
    """Held-out error rate after 300 steps and the steps the ceiling bounded."""
    module = ZeroInitResidualMLP(seed, lr)
    data = torch.utils.data.TensorDataset(module.x[:1536], module.y[:1536])
    shuffle = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=shuffle)
    guard = ExplosionGuard(console_summary=False, **({} if ceiling else {"max_relative_update": None}))
    quiet_trainer(max_steps=300, callbacks=[guard]).fit(module, loader)
    with torch.no_grad():
        error = (module(module.x[1536:]).argmax(1) != module.y[1536:]).float().mean().item()
    return error, guard.policy().counts.get("relative_update", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for lr in (1e-3, 3e-3):
        off, on, bounded = [], [], []
        for seed in range(3):
            off.append(run(seed, lr, ceiling=False)[0])
            error, steps = run(seed, lr, ceiling=True)
            on.append(error)
            bounded.append(steps)
        rows.append(
            f"| {lr:g} | {sum(off) / 3:.3f} [{min(off):.3f}-{max(off):.3f}] | {sum(on) / 3:.3f} [{min(on):.3f}-"
            f"{max(on):.3f}] | {', '.join(map(str, bounded))} |"
        )
    write_results(
        args.output,
        "The relative-update ceiling on a zero-initialised residual MLP (CPU)",
        [
            "task: 6 residual blocks whose last layer starts at 0 and a zero readout, AdamW, 300 steps of 64, 3 "
            "seeds; cell = held-out error rate, mean [min-max]; the default `ExplosionGuard()` with "
            "`max_relative_update` at 0.1 (on) or `None` (off)",
        ],
        ["| lr | ceiling off | ceiling on | steps bounded per seed |", "|---|---|---|---|", *rows],
    )

if __name__ == "__main__":
    main()
