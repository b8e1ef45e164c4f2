"""``summary.json``: what one run ended with, written by global rank 0 into the job's directory.

It holds the final train/val loss and accuracy, their per-epoch curves, whether the run diverged, the guard's
actions by type, the codes of the audit/advisor findings and the wall time. The sweep summary
(``examples/sweep_summary.py``) reads nothing else. It is written from inside the training processes
because under ``ddp_spawn`` only the weights travel back to the launching process, not the callbacks' state.
"""

from __future__ import annotations

import atexit
import json
import math
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from examples.divergence import StopWhenDiverged
from lightning_gradstab import ArchitectureAdvisor, ExplosionGuard, InitAudit
from lightning_gradstab.callbacks._shared import set_next_steps

FINAL_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")
SUMMARY_FILE = "summary.json"


def _finite_or_none(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def guard_actions(callbacks: list[Callback]) -> dict[str, int]:
    """Count the actions the suite's guard took, by type, over all optimizers (empty without a guard).

    Read from ``ExplosionGuard.summary()``, the guard's public account of what it did.

    Example::

        guard_actions(trainer.callbacks)  # {"clip": 13, "skip": 2, "spike": 13}
    """
    counts: Counter[str] = Counter()
    for callback in callbacks:
        if not isinstance(callback, ExplosionGuard):
            continue
        for optimizer in callback.summary()["optimizers"].values():
            counts.update(optimizer["counts"])
    return dict(sorted(counts.items()))


def guard_stop_reason(callbacks: list[Callback]) -> str | None:
    """Why the guard stopped the run, or None if it did not (or there is no guard).

    Example::

        guard_stop_reason(trainer.callbacks)  # None for a run the guard let finish
    """
    for callback in callbacks:
        if isinstance(callback, ExplosionGuard) and callback.stop_reason is not None:
            return str(callback.stop_reason)
    return None


def finding_codes(callbacks: list[Callback]) -> list[str]:
    """The codes of the findings ``InitAudit`` and ``ArchitectureAdvisor`` reported, in order, each once.

    Example::

        finding_codes(trainer.callbacks)  # ["init.scale", "signal.vanishing"]
    """
    codes: list[str] = []
    for callback in callbacks:
        if isinstance(callback, (InitAudit, ArchitectureAdvisor)) and callback.report is not None:
            codes += [finding.code for finding in callback.report.findings]
    return list(dict.fromkeys(codes))


def reinitialized_modules(callbacks: list[Callback]) -> list[str]:
    """The modules ``InitAudit(fix=True)`` re-initialised before the first update.

    Example::

        reinitialized_modules(trainer.callbacks)  # ["network.1.layer", ...]
    """
    return [name for callback in callbacks if isinstance(callback, InitAudit) for name in callback.fixed_modules]


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write ``summary`` as indented JSON (metrics are stored finite or null: the JSON standard has no NaN).

    Example::

        write_summary(Path("outputs/run/summary.json"), {"status": "failed", "error": "..."})
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")


class RunSummary(Callback):
    """Collect per-epoch metrics and write ``summary.json`` at the end of fit (or when fit raises).

    Args:
        output_dir: the job's directory; the file is ``output_dir/summary.json``.
        metadata: identifies the run in sweep tables (name, overrides, config-group choices).
        next_steps: the suite's end-of-fit advice in this run's terms (finding code -> sentence), registered
            in ``setup``, which runs in every training process (``ddp_spawn`` ranks too).

    Example::

        trainer = pl.Trainer(callbacks=[StopWhenDiverged(), RunSummary(Path("out"), {"name": "demo"})])
    """

    def __init__(self, output_dir: Path, metadata: dict[str, Any], next_steps: dict[str, str] | None = None) -> None:
        self.path = Path(output_dir) / SUMMARY_FILE
        self.metadata = dict(metadata)
        self.next_steps = dict(next_steps or {})
        self.curves: dict[str, list[float | None]] = {name: [] for name in ("epoch", *FINAL_METRICS)}
        self.started_at = time.perf_counter()
        self.initial_train_loss: float | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.next_steps:
            set_next_steps(trainer, self.next_steps)
        if dist.is_available() and dist.is_initialized():  # a rank of a ddp / ddp_spawn job
            atexit.register(_close_process_group)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started_at = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the loss of the first batch, before any update: the l0 of Wortsman et al.'s LR sensitivity
        if self.initial_train_loss is None and isinstance(outputs, dict) and "loss" in outputs:
            self.initial_train_loss = _finite_or_none(outputs["loss"].detach())

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.curves["epoch"].append(trainer.current_epoch)
        for name in FINAL_METRICS:
            key = f"{name}_epoch" if f"{name}_epoch" in metrics else name
            self.curves[name].append(_finite_or_none(metrics[key]) if key in metrics else None)

    def summary(self, trainer: pl.Trainer | None, error: BaseException | None) -> dict[str, Any]:
        """The summary of the run so far; ``trainer`` is None when the run failed before training."""
        callbacks = list(trainer.callbacks) if trainer is not None else []
        stopper = next((c for c in callbacks if isinstance(c, StopWhenDiverged)), None)
        diverged = bool(stopper and stopper.diverged)
        final = {name: (values[-1] if values else None) for name, values in self.curves.items() if name != "epoch"}
        stop_reason = guard_stop_reason(callbacks)
        if error is not None:
            status = "failed"
        elif diverged:
            status = "diverged"
        elif stop_reason is not None:
            status = "stopped by guard"
        else:
            status = "finished"
        return {
            **self.metadata,
            "status": status,
            "diverged": diverged,
            "diverged_at_step": stopper.diverged_at_step if stopper else None,
            "error": None if error is None else "".join(traceback.format_exception_only(error)).strip(),
            "final": final,
            "initial_train_loss": self.initial_train_loss,
            "best_val_acc": max((v for v in self.curves["val/acc"] if v is not None), default=None),
            "epochs": len(self.curves["epoch"]),
            "global_step": trainer.global_step if trainer is not None else 0,
            "guard_actions": guard_actions(callbacks),
            "guard_stop_reason": stop_reason,
            "findings": finding_codes(callbacks),
            "diagnosis_ran": any(isinstance(c, (InitAudit, ArchitectureAdvisor)) for c in callbacks),
            "reinitialized_modules": reinitialized_modules(callbacks),
            "wall_time_s": round(time.perf_counter() - self.started_at, 2),
            "curves": self.curves,
        }

    def write(self, trainer: pl.Trainer | None, error: BaseException | None = None) -> None:
        """Write ``summary.json`` (call on global rank 0 only)."""
        write_summary(self.path, self.summary(trainer, error))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            self.write(trainer, exception)


def _close_process_group() -> None:
    """Destroy the default process group when a rank's interpreter exits, before its C++ objects are torn down.

    Lightning's spawn launcher leaves the group to the interpreter's shutdown; gloo's threads then meet static
    destruction and a rank sometimes aborts after its fit has finished ("terminate called without an active
    exception": one job of a 2-job CPU multirun, once in three fresh-clone CI runs here). ``atexit`` runs after the
    rank's last collective; registering it twice is harmless (the second call finds no group).
    """
    if dist.is_initialized():
        dist.destroy_process_group()
