"""The training loop every example task shares: loss, accuracy, optimizer and learning-rate warm-up.

A task supplies its datasets, how to build its network from the model config, and a ``loss_and_correct``
rule; everything that is logged (``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``) is named the same
in every task, so sweep tables compare tasks column by column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric
from typing_extensions import override

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class ExampleTask(pl.LightningModule):
    """Trains ``self.network`` on the task's datasets and logs loss and accuracy per split.

    Args:
        build_optimizer: called with the parameters (``conf/optim/*.yaml`` is a ``_partial_`` optimizer).
        warmup_steps: linear learning-rate warm-up over this many optimizer steps (0 = none).
        batch_size: samples per batch and per process.
        cosine_steps: after the warm-up, decay the learning rate to zero along a cosine over this many optimizer
            steps (Wortsman et al. 2023's schedule; 0 = constant after the warm-up).

    Example::

        task = DigitsTask(partial(build_mlp, depth=8), partial(torch.optim.SGD, lr=0.02), warmup_steps=0)
    """

    def __init__(
        self, build_optimizer: OptimizerFactory, warmup_steps: int = 0, batch_size: int = 32, cosine_steps: int = 0
    ) -> None:
        super().__init__()
        if isinstance(cosine_steps, bool) or not isinstance(cosine_steps, int) or cosine_steps < 0:
            raise ValueError(f"`cosine_steps` must be an int >= 0, got {cosine_steps!r}")
        self.cosine_steps = cosine_steps
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an int >= 0, got {warmup_steps!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
        self.build_optimizer = build_optimizer
        self.warmup_steps = warmup_steps
        self.batch_size = batch_size
        # a mean of per-sample 0/1 outcomes: torchmetrics reduces it across ranks at epoch end
        self.train_accuracy, self.val_accuracy = MeanMetric(), MeanMetric()
        self.train_dataset: Dataset = None  # type: ignore[assignment]  # set by the subclass
        self.val_dataset: Dataset = None  # type: ignore[assignment]

    @staticmethod
    def build_network(build: Callable[..., nn.Module], task_name: str, **sizes: Any) -> nn.Module:
        """Call the model builder with the task's input/output sizes, naming both when they do not fit."""
        try:
            return build(**sizes)
        except TypeError as error:
            builder = getattr(build, "func", build)
            raise TypeError(
                f"model builder {getattr(builder, '__name__', builder)!r} does not fit task {task_name!r} "
                f"(which provides {sorted(sizes)}): {error}. Choose a model made for this task."
            ) from error

    def loss_and_correct(self, batch: Any) -> tuple[Tensor, Tensor]:
        """The mean loss of ``batch`` and a 0/1 tensor saying which predictions are correct."""
        raise NotImplementedError

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, correct = self.loss_and_correct(batch)
        self.latest_loss = loss.detach()  # read by loss-based skip rules (OLMo-core's, in benchmarks/peers.py)
        self.train_accuracy.update(correct.float())
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, correct = self.loss_and_correct(batch)
        self.val_accuracy.update(correct.float())
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_accuracy, on_epoch=True, prog_bar=True)

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        optimizer = self.build_optimizer(self.parameters())
        if self.warmup_steps == 0 and self.cosine_steps == 0:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """The learning rate at optimizer step ``step`` as a fraction of the configured one."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.cosine_steps == 0:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / self.cosine_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=max(self.batch_size, 256))
