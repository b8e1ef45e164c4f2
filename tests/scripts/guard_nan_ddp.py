"""2-process CPU DDP job: NaN on rank 1 only, before and after DDP's gradient all-reduce.

Usage: ``python guard_nan_ddp.py OUT_DIR [fp16]``; each rank writes ``OUT_DIR/rank{N}.json`` with what its
guard decided, the weights and (with ``fp16``: an fp16 ``GradScaler`` on CPU) the loss scale after every step,
so the test can check that both ranks acted identically.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_gradstab.callbacks.guard import ExplosionGuard
from tests.helpers.trainers import quiet_trainer
from tests.scripts.guard_models import (
    NanGradientAfterReduction,
    TinyRegression,
    WeightsByStep,
    regression_loader,
    write_rank_result,
)

NAN_LOSS_STEP = 30  # rank 1's loss is NaN: DDP's all-reduce spreads it to every rank
NAN_GRAD_STEP = 40  # rank 1's gradient turns NaN after the all-reduce: only the guard's reduction tells rank 0
STEPS = 50


def main(out_dir: Path, mode: str = "fp32") -> None:
    torch.set_num_threads(1)
    model = TinyRegression(faults={NAN_LOSS_STEP: "nan_loss"}, fault_rank=1)
    guard, weights = ExplosionGuard(console_summary=False), WeightsByStep()
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        callbacks=[NanGradientAfterReduction(NAN_GRAD_STEP, rank=1), guard, weights],
        default_root_dir=str(out_dir),
        plugins=[MixedPrecision("16-mixed", "cpu")] if mode == "fp16" else None,
    )
    trainer.fit(model, regression_loader())
    write_rank_result(out_dir, trainer, guard, weights)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
