"""2-process CPU DDP job: NaN on rank 1 only, before and after DDP's gradient all-reduce.

Usage: ``python guard_nan_ddp.py OUT_DIR [fp16]``; each rank writes ``OUT_DIR/rank{N}.json`` with what its
guard decided, the weights and (with ``fp16``: an fp16 ``GradScaler`` on CPU) the loss scale after every step,
so the test can check that both ranks acted identically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_gradstab.callbacks.guard import ExplosionGuard
from tests.helpers.trainers import quiet_trainer
from tests.scripts.guard_models import NanGradientAfterReduction, TinyRegression, regression_loader

NAN_LOSS_STEP = 30  # rank 1's loss is NaN: DDP's all-reduce spreads it to every rank
NAN_GRAD_STEP = 40  # rank 1's gradient turns NaN after the all-reduce: only the guard's reduction tells rank 0
STEPS = 50


class _Weights(Callback):
    def __init__(self) -> None:
        self.by_step: dict[int, list[float]] = {}
        self.loss_scales: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.by_step[trainer.global_step] = pl_module.flat_weights().tolist()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.loss_scales[trainer.global_step] = scaler.get_scale()


def main(out_dir: Path, mode: str = "fp32") -> None:
    torch.set_num_threads(1)
    model = TinyRegression(faults={NAN_LOSS_STEP: "nan_loss"}, fault_rank=1)
    guard, weights = ExplosionGuard(console_summary=False), _Weights()
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        callbacks=[NanGradientAfterReduction(NAN_GRAD_STEP, rank=1), guard, weights],
        default_root_dir=str(out_dir),
        plugins=[MixedPrecision("16-mixed", "cpu")] if mode == "fp16" else None,
    )
    trainer.fit(model, regression_loader())
    result = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "events": guard.policy().events,
        "counts": guard.policy().counts,
        "weights": {str(step): values for step, values in weights.by_step.items()},
        "loss_scales": {str(step): scale for step, scale in weights.loss_scales.items()},
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
