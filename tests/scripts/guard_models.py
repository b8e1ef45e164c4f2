"""Tiny real trainings for the ExplosionGuard tests: a regression MLP with injectable faults.

Shared by ``tests/test_guard.py`` and the DDP jobs ``tests/scripts/guard_nan_ddp.py`` and ``guard_repeat_ddp.py``
(with the per-step weight record and the rank result file they write) so they train the
same model on the same data. Its network is ``tests.helpers.models.tanh_mlp`` (as ``TinyRegressor``'s), wider
(32) and seeded here; the data (a sine of a projection, 512 samples) and the fault injection are its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.models import tanh_mlp
from tests.helpers.trainers import QUIET  # noqa: F401  (imported from here by scripts/gpu_precision_check.py)


def regression_data(samples: int = 512, seed: int = 0) -> TensorDataset:
    """``y = sin(x . w) + noise``: smooth, learnable, and fast on one CPU thread."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 8, generator=generator)
    w = torch.randn(8, 1, generator=generator)
    y = torch.sin(x @ w) + 0.1 * torch.randn(samples, 1, generator=generator)
    return TensorDataset(x, y)


def regression_loader(batch_size: int = 32) -> DataLoader:
    """The data in a fixed order, so two runs see the same batches."""
    return DataLoader(regression_data(), batch_size=batch_size, shuffle=False)


class TinyRegression(pl.LightningModule):
    """8-32-32-1 tanh MLP; ``faults`` maps a global step to ``"scale_grad"`` (x1e4), ``"nan_grad"`` (a NaN in
    every gradient, the loss finite), ``"nan_loss"`` or
    ``"zero_loss"`` (the loss times 0: exactly zero gradients, as in a phase before a loss term is switched on).

    ``fault_rank`` restricts the faults to one rank (``None``: every rank).
    """

    def __init__(
        self,
        lr: float = 0.05,
        optimizer: str = "sgd",
        faults: dict[int, str] | None = None,
        fault_rank: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = tanh_mlp(width=32, depth=3)
        self.lr = lr
        self.optimizer_name = optimizer
        self.faults = faults or {}
        self.fault_rank = fault_rank

    def _fault(self) -> str | None:
        if self.fault_rank is not None and self.global_rank != self.fault_rank:
            return None
        return self.faults.get(self.global_step)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self._fault() == "nan_loss":
            loss = loss * float("nan")
        if self._fault() == "zero_loss":
            loss = loss * 0.0
        return loss

    def on_after_backward(self) -> None:
        if self._fault() in ("scale_grad", "nan_grad"):
            for parameter in self.parameters():
                parameter.grad.mul_(1e4 if self._fault() == "scale_grad" else math.nan)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def full_loss(self) -> float:
        """Mean squared error on the whole data set (nan if the weights are not finite)."""
        x, y = regression_data().tensors
        with torch.no_grad():
            return nn.functional.mse_loss(self.net(x), y).item()

    def flat_weights(self) -> torch.Tensor:
        """All weights as one vector (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()]).clone()


class NanGradientAfterReduction(Callback):
    """Poison one rank's gradients in ``on_before_optimizer_step``, after DDP averaged them.

    Put it before the guard in ``callbacks``: only that rank then sees the NaN, the hardest case for a
    rank-consistent decision.
    """

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            next(iter(pl_module.parameters())).grad.view(-1)[0] = float("nan")


CLIMB_FAULTS: dict[int, str] = {30: "scale_grad", 31: "scale_grad", 32: "nan_grad", 33: "nan_grad", 34: "nan_grad"}
"""Faults that climb the ladder one rung per step from step 30 under budgets of 1: two gradient spikes (clip, then
tight clip: all that gradient evidence may do) and then non-finite gradients, the evidence of damage that skips,
backs off and rolls back."""


class WeightsByStep(Callback):
    """After every training step: all weights as one list (and the fp16 loss scale, when there is one), keyed by
    the global step, for DDP jobs whose test checks that every rank ended each step with the same weights."""

    def __init__(self) -> None:
        self.by_step: dict[int, list[float]] = {}
        self.loss_scales: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.by_step[trainer.global_step] = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).tolist()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.loss_scales[trainer.global_step] = scaler.get_scale()


def write_rank_result(out_dir: Path, trainer: pl.Trainer, guard: Any, weights: WeightsByStep) -> None:
    """``out_dir/rank{N}.json``: what this rank's guard decided and counted, and the weights after every step."""
    result = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "events": guard.policy().events,
        "counts": guard.policy().counts,
        "weights": {str(step): values for step, values in weights.by_step.items()},
        "loss_scales": {str(step): scale for step, scale in weights.loss_scales.items()},
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
