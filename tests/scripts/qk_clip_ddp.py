"""2-process CPU DDP job: a char GPT at a high AdamW LR whose attention logits grow past the guard's cap, each rank
on its own shard of the data, so each rank measures different logits; the guard must rescale alike on both. With
``ceiling`` the default guard's relative-update ceiling shrinks the steps instead, and must do so alike on both.
With ``edit`` rank 1 alone writes into a weight before step ``EDIT_AT`` (a user's in-place change): both ranks must
start afresh from it at the same step.

Usage: ``python qk_clip_ddp.py OUT_DIR [qk|ceiling|edit]``; each rank writes ``OUT_DIR/rank{N}.json`` with its guard's
counts and a digest of the weights after every step.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_gradstab.callbacks.guard import ExplosionGuard
from tests.helpers.trainers import quiet_trainer
from tests.test_qk_clip import _CharLM, _text_loader

STEPS = 30
EDIT_AT = 15


class WeightDigests(pl.Callback):
    """A digest of every weight after each training step (bit-exact comparison across ranks, small files)."""

    def __init__(self) -> None:
        self.by_step: dict[int, str] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        self.by_step[trainer.global_step] = hashlib.sha256(flat.numpy().tobytes()).hexdigest()


class RankOneEdit(pl.Callback):
    """Rank 1 halves one weight in place before step ``EDIT_AT``; rank 0 does nothing."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == EDIT_AT and trainer.global_rank == 1:
            with torch.no_grad():
                next(pl_module.parameters()).mul_(0.5)


def main(out_dir: Path, mode: str) -> None:
    torch.set_num_threads(1)
    module = _CharLM(lr=0.3)
    # "qk": QK-clip alone (the relative-update ceiling would hold the run before its logits grow); "ceiling": the
    # default guard, whose ceiling then shrinks the steps of every rank alike
    guard = ExplosionGuard(console_summary=False, max_relative_update=None if mode == "qk" else 0.1)
    digests = WeightDigests()
    extra = [RankOneEdit()] if mode == "edit" else []
    trainer = quiet_trainer(
        devices=2, strategy="ddp", max_steps=STEPS, callbacks=[guard, digests, *extra], default_root_dir=str(out_dir),
    )
    trainer.fit(module, _text_loader())  # Lightning's DistributedSampler: each rank its own batches
    result = {
        "global_step": trainer.global_step, "counts": guard.policy().counts, "weights": digests.by_step,
        "outside_write_step": guard.policy().state.outside_write_step,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "qk")
