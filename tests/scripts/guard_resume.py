"""A guarded training that checkpoints every 5 steps and is SIGKILLed at step ``KILL_STEP`` (a crashed node).

Usage: ``python guard_resume.py OUT_DIR``; the checkpoints land in ``OUT_DIR/checkpoints``. Shared with
``tests/test_guard.py``, which resumes from the last checkpoint and compares with the uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_gradstab.callbacks.guard import ExplosionGuard
from lightning_gradstab.guard.config import PolicyConfig
from tests.helpers.trainers import quiet_trainer
from tests.scripts.guard_models import CLIMB_FAULTS, TinyRegression, regression_loader

KILL_STEP, STEPS = 52, 70
# climbs to rollback at policy step 65, after the resume
FAULTS = {step + 30: fault for step, fault in CLIMB_FAULTS.items()}
BUDGETS = {"clip": 1, "tight_clip": 1, "skip": 1, "lr_backoff": 1}


def guard() -> ExplosionGuard:
    # snapshot_every=20: snapshots at steps 26 and 47 (the first refreshes come once half the run so far has passed,
    # then every 20 healthy steps), so the last one before the rollback at step 65 is taken before the crash at 52
    return ExplosionGuard(console_summary=False, config=PolicyConfig(budgets=BUDGETS, snapshot_every=20))


def checkpointing(directory: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=str(directory), every_n_train_steps=5, save_last=True, save_top_k=-1)


class _Kill(Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == KILL_STEP:
            os.kill(os.getpid(), signal.SIGKILL)


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    trainer = quiet_trainer(
        max_steps=STEPS, default_root_dir=str(out_dir), enable_checkpointing=True,
        callbacks=[guard(), checkpointing(out_dir / "checkpoints"), _Kill()],
    )
    trainer.fit(TinyRegression(faults=FAULTS), regression_loader())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
