"""2-process CPU DDP cell of the compatibility matrix: the matrix model, 8 steps, with or without the suite.

Usage: ``python matrix_ddp.py OUT_DIR MODE`` with MODE one of

- ``without_suite``: plain DDP training (the reference);
- ``full_suite``: the same with monitor, guard, audit and advisor;
- ``rank_local_faults``: the full suite, rank 1 gets a NaN in its input batch at step ``NAN_INPUT_STEP``
  (DDP's all-reduce spreads it) and rank 0 alone gets an Inf in one gradient *after* the all-reduce at step
  ``INF_GRAD_STEP`` (only the guard's own reduction tells rank 1);
- ``persistent_rank_fault``: the full suite, rank 1's input is NaN on every batch from ``NAN_INPUT_STEP`` on,
  for up to ``PERSISTENT_STEPS`` steps: the guard climbs its whole ladder and must stop both ranks together.

Each rank writes ``OUT_DIR/rank{N}.json``: final weights, the weights after every step, what the guard did
and, on rank 0, the logged total norms next to a float64 reference.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradstab import ExplosionGuard
from tests.conftest import MemoryLogger
from tests.helpers.trainers import quiet_trainer
from tests.matrix_support import Cell, GradientReference, build_model, full_suite, guard_actions

STEPS = 8
NAN_INPUT_STEP = 3  # optimizer steps done before the faulty batch
INF_GRAD_STEP = 5
PERSISTENT_STEPS = 40


class InfGradientAfterReduction(Callback):
    """Puts an Inf into one gradient entry on one rank only, after DDP's all-reduce (a rank-local fault)."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            pl_module.body[3].weight.grad[0, 0] = math.inf


class WeightsPerStep(Callback):
    """Flattened weights after every optimizer step, to check that a skipped step left them unchanged."""

    def __init__(self) -> None:
        self.by_step: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.by_step[trainer.global_step] = flat_weights(pl_module)


def flat_weights(module: torch.nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in module.state_dict().values()]).tolist()


def main(out_dir: Path, mode: str) -> None:
    torch.set_num_threads(1)
    faulty = mode == "rank_local_faults"
    persistent = mode == "persistent_rank_fault"
    steps = PERSISTENT_STEPS if persistent else STEPS
    on_rank_1 = os.environ.get("LOCAL_RANK", "0") == "1"  # the launcher sets it for the child rank
    fault = {}
    if on_rank_1 and faulty:
        fault = {NAN_INPUT_STEP: "nan_input"}
    elif on_rank_1 and persistent:
        fault = {batch: "nan_input" for batch in range(NAN_INPUT_STEP, steps)}
    model = build_model(Cell(mode, {"fault": fault}))
    suite = full_suite() if mode != "without_suite" else []
    reference, weights, logger = GradientReference(), WeightsPerStep(), MemoryLogger()
    injectors = [InfGradientAfterReduction(INF_GRAD_STEP, rank=0)] if faulty else []
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_steps=steps,
        log_every_n_steps=1,
        limit_val_batches=0,
        callbacks=[*injectors, reference, *suite, weights],
        logger=logger,
        default_root_dir=str(out_dir),
    )
    trainer.fit(model)
    guard = next((c for c in suite if isinstance(c, ExplosionGuard)), None)
    result = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "weights": flat_weights(model),
        "weights_by_step": {str(step): values for step, values in weights.by_step.items()},
        "guard_actions": guard_actions(guard) if guard else None,
        "guard_steps": guard.policy(0).state.steps if guard else None,
        "guard_events": guard.policy(0).events if guard else None,
        "guard_level": guard.policy(0).level if guard else None,
        "stop_reason": guard.stop_reason if guard else None,
        "logged_total_norms": logger.metrics.get("gradstab/grad_norm/total", []),
        "logged_nonfinite": logger.metrics.get("gradstab/nonfinite/count", []),
        "reference_total_norms": reference.total_norms[0],
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
