"""2-process CPU DDP job: one rank's disk rollback snapshot is damaged before the rollback that needs it.

Usage: ``python reliability_ddp.py OUT_DIR MODE`` with MODE ``corrupt`` (bytes of rank 1's file flipped, same size:
only its checksum tells) or ``remove`` (rank 1's file deleted). Gradients blow up x1e4 on steps 30-34, so with
budgets of one the ladder asks for a rollback at step 35. Each rank writes ``OUT_DIR/rank{N}.json`` with its
guard's events, its weights after every step, the warnings it saw and the snapshot files left at the end.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradstab.callbacks.guard import ExplosionGuard
from lightning_gradstab.guard.config import PolicyConfig
from tests.helpers.trainers import quiet_trainer
from tests.scripts.guard_models import CLIMB_FAULTS, TinyRegression, regression_loader

FAULTS = CLIMB_FAULTS
DAMAGE_STEP = 33  # after the snapshot of step 21, before the rollback of step 35
ROLLBACK_STEP = 35
STEPS = 40


class _Damage(Callback):
    """Damage rank 1's snapshot file after ``DAMAGE_STEP`` and record every rank's weights after each step."""

    def __init__(self, guard: ExplosionGuard, mode: str) -> None:
        self.guard, self.mode = guard, mode
        self.by_step: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.by_step[trainer.global_step] = pl_module.flat_weights().tolist()
        if trainer.global_step != DAMAGE_STEP or trainer.global_rank != 1:
            return
        path = self.guard.rollback_snapshot.path
        if self.mode == "remove":
            path.unlink()
        else:
            data = bytearray(path.read_bytes())
            data[: len(data) // 2] = bytes(b ^ 0xFF for b in data[: len(data) // 2])
            path.write_bytes(bytes(data))


def main(out_dir: Path, mode: str) -> None:
    torch.set_num_threads(1)
    guard = ExplosionGuard(
        console_summary=False,
        config=PolicyConfig(budgets={"clip": 1, "tight_clip": 1, "skip": 1, "lr_backoff": 1}, snapshot_every=10),
        snapshot_location="disk",
        snapshot_dir=out_dir / "snapshots",
    )
    damage = _Damage(guard, mode)
    trainer = quiet_trainer(
        devices=2, strategy="ddp", max_steps=STEPS, callbacks=[guard, damage], default_root_dir=str(out_dir)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyRegression(optimizer="adam", lr=0.01, faults=FAULTS), regression_loader())
    result = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "events": guard.policy().events,
        "weights": {str(step): values for step, values in damage.by_step.items()},
        "warnings": [str(w.message) for w in caught if "rollback" in str(w.message)],
        "files_left": sorted(p.name for p in (out_dir / "snapshots").glob("*")),
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
