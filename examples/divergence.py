"""Stop a run that is lost: its training loss has been non-finite for several consecutive steps.

A single non-finite loss is not a lost run (a guard may skip that step and training goes on), but once the
weights themselves are NaN every later loss is too, and continuing only burns the sweep's time. The decision
is reduced across ranks so every process stops on the same step.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class StopWhenDiverged(Callback):
    """Set ``trainer.should_stop`` after ``patience`` consecutive non-finite training losses.

    Args:
        patience: consecutive non-finite steps that count as divergence.

    Example::

        stopper = StopWhenDiverged(patience=10)
        trainer = pl.Trainer(callbacks=[stopper]); trainer.fit(model)
        print(stopper.diverged, stopper.diverged_at_step)
    """

    def __init__(self, patience: int = 10) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be an int >= 1, got {patience!r}")
        self.patience = patience
        self.nonfinite_streak = 0
        self.diverged = False
        self.diverged_at_step: int | None = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        # the progress bar reads the loss on the host every step anyway: this adds no extra sync
        finite = bool(torch.isfinite(loss.detach()).all()) if isinstance(loss, torch.Tensor) else True
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        lost = trainer.strategy.reduce_boolean_decision(self.nonfinite_streak >= self.patience, all=False)
        if lost and not self.diverged:
            self.diverged, self.diverged_at_step = True, trainer.global_step
            trainer.should_stop = True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "nonfinite_streak": self.nonfinite_streak,
            "diverged": self.diverged,
            "diverged_at_step": self.diverged_at_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.nonfinite_streak = state_dict["nonfinite_streak"]
        self.diverged = state_dict["diverged"]
        self.diverged_at_step = state_dict["diverged_at_step"]
