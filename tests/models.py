"""Tiny real LightningModules the tests train for a few CPU steps."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def regression_data(n: int = 64, features: int = 8, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = x @ torch.randn(features, 1, generator=generator) + 0.1 * torch.randn(n, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


class TinyRegressor(pl.LightningModule):
    """An MLP regressor trained with SGD; ``frozen`` freezes its first layer, ``tied`` ties two layers."""

    def __init__(self, width: int = 16, depth: int = 3, lr: float = 0.05, frozen: bool = False, tied: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(8, width), nn.Tanh()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), nn.Tanh()]
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        if frozen:
            self.net[0].requires_grad_(False)
        if tied and depth >= 4:
            self.net[4].weight = self.net[2].weight
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self):
        return regression_data()


class TwoOptimizerModule(pl.LightningModule):
    """GAN-style manual optimization: two sub-networks, two optimizers, both stepped every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.critic = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_c = self.optimizers()
        critic_loss = self.critic(self.generator(x).detach()).mean() - self.critic(x).mean()
        opt_c.zero_grad()
        self.manual_backward(critic_loss)
        opt_c.step()
        generator_loss = -self.critic(self.generator(x)).mean()
        opt_g.zero_grad()
        self.manual_backward(generator_loss)
        opt_g.step()

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.Adam(self.critic.parameters(), lr=1e-3),
        )

    def train_dataloader(self):
        return regression_data()
