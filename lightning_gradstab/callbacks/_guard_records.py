"""What :class:`~lightning_gradstab.ExplosionGuard` records of its decisions: scalars, console lines and files.

Per optimizer step it logs the guard's scalars (every ``log_every_n_steps`` and on every intervention), says
each step that acts above clipping in one console line (the first :data:`SKIP_LINES` plain skips of a fit,
the rest counted), appends the new events to ``gradstab_guard_events.jsonl`` and writes the outcome to
``gradstab_guard_summary.json``. A full disk or a bad log directory never stops training: the decision stands
(it is kept in the guard's ``state_dict``) and only its record is dropped, with one warning. Kept apart from
``guard.py`` so the callback holds the hooks and the decisions, not their bookkeeping.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from rich.markup import escape

from lightning_gradstab.callbacks._guard_summary import effective_lr_metric
from lightning_gradstab.callbacks._shared import log_metrics, logging_step
from lightning_gradstab.console import console_print
from lightning_gradstab.guard.config import RUNGS
from lightning_gradstab.guard.decision import Decision
from lightning_gradstab.guard.ladder import ExplosionPolicy

EVENTS_FILENAME = "gradstab_guard_events.jsonl"
SUMMARY_FILENAME = "gradstab_guard_summary.json"

SKIP_LINES = 5
"""Skips said on the console per fit; later ones are counted in the summary and the event file."""


class GuardRecords:
    """The guard's log directory, the events already written per optimizer and the console's skip count.

    Example::

        records = GuardRecords()
        records.start_fit(Path("logs"))  # at fit start, on every rank
    """

    def __init__(self) -> None:
        self.log_dir: Path | None = None
        self._unwritable = False
        self._written_events: dict[int, int] = {}  # optimizer index -> events of its policy recorded so far
        self._skip_lines = 0  # skips said on the console so far this fit (the first few; the rest are counted)

    def start_fit(self, log_dir: Path) -> None:
        """Write into ``log_dir`` from now on (a fresh chance for a directory that was unwritable)."""
        self.log_dir = log_dir
        self._unwritable = False

    def start_training(self) -> None:
        """A new fit's console: its first skips are said again."""
        self._skip_lines = 0

    def forget(self) -> None:
        """A new run: no optimizer's events are written yet."""
        self._written_events.clear()

    def seen(self, index: int, policy: ExplosionPolicy) -> None:
        """Treat every event ``policy`` holds now as written (a new policy, or one loaded from a checkpoint)."""
        self._written_events[index] = policy.events_recorded

    @property
    def summary_path(self) -> Path | None:
        """Where the summary is written (``None`` before the first fit starts)."""
        return None if self.log_dir is None else self.log_dir / SUMMARY_FILENAME

    def write_summary(self, trainer: pl.Trainer, summary: dict[str, Any]) -> None:
        """Write ``summary`` as JSON (global rank 0)."""
        path = self.summary_path
        if trainer.global_rank == 0 and path is not None:
            self._write(path, json.dumps(summary, indent=2), mode="w")

    def report(
        self, trainer: pl.Trainer, index: int, policy: ExplosionPolicy, decision: Decision, every: int | None
    ) -> None:
        """Log the step's scalars (every ``every`` steps, default the trainer's, and on new events), say the new
        events on the console and append them to the event file."""
        step = logging_step(trainer)
        # Trainer.log_every_n_steps is set by Lightning's logger connector at init; the class does not declare it
        interval = every or trainer.log_every_n_steps  # type: ignore[attr-defined]
        new_events = policy.events_since(self._written_events.get(index, 0))
        self._written_events[index] = policy.events_recorded
        if not new_events and step % max(interval, 1) != 0:
            return
        # the monitor's naming: one optimizer unscoped, several each under opt{i}/ (opt0 included)
        prefix = "gradstab/" if len(trainer.optimizers) <= 1 else f"gradstab/opt{index}/"
        counts = policy.counts
        metrics = {
            "level": float(decision.level),
            "clipped": float("clip" in decision.actions),
            "skipped": float(decision.skip),
            "lr_scale": decision.lr_scale if not decision.skip else policy.lr_scale,
            "rollbacks": float(counts.get("rollback", 0)),
            "zscore": decision.zscore,
            "amp_overflow": float(counts.get("amp_overflow", 0)),
        }
        if math.isfinite(decision.clip_threshold):
            metrics["clip_threshold"] = decision.clip_threshold
        scalars = {prefix + name: value for name, value in metrics.items()}
        scalars.update(effective_lr_metric(trainer, index, metrics["lr_scale"]))  # beside LearningRateMonitor's
        log_metrics(trainer, scalars, step)
        for event in new_events:
            line = move_line(index, event) if trainer.global_rank == 0 else None
            if line is not None and not (event["actions"] == ["skip"] and self._quiet_skip()):
                console_print(escape(line), trainer=trainer)
        if new_events and trainer.global_rank == 0 and self.log_dir is not None:
            lines = "".join(json.dumps({"optimizer": index, "logging_step": step, **e}) + "\n" for e in new_events)
            self._write(self.log_dir / EVENTS_FILENAME, lines, mode="a")

    def _quiet_skip(self) -> bool:
        """Whether a plain skip goes unsaid: the first :data:`SKIP_LINES` of a fit are said, the rest counted."""
        self._skip_lines += 1
        if self._skip_lines == SKIP_LINES + 1:
            return False  # said once more, as the last one: see move_line
        return self._skip_lines > SKIP_LINES

    def _write(self, path: Path, text: str, mode: str) -> None:
        # the record of a decision is monitoring: a full disk or a bad log dir must not stop training, and
        # the decision itself already stands (it is also kept in ``state_dict``)
        if self._unwritable:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, mode) as stream:
                stream.write(text)
        except OSError as error:
            self._unwritable = True
            rank_zero_warn(
                f"lightning_gradstab: ExplosionGuard cannot write {str(path)!r} ({error!r}); its event log and "
                "summary are not written to disk from now on (decisions and scalar logging go on)."
            )


def stop_reason(decision: Decision) -> str:
    """Why the guard stopped the run, as the summary and the error say it."""
    why = (
        "with the learning rate already backed off below 1/1000"
        if decision.anomaly == "divergence"
        else "after every lower rung's budget was spent"
    )
    return f"step {decision.step}: {decision.anomaly} at level {decision.level} ({decision.rung}) {why}" + (
        f" ({decision.evidence} evidence)" if decision.evidence else ""
    )


def move_line(index: int, event: dict[str, Any]) -> str | None:
    """The one console line for an event that acts above clipping (skip, back-off, rollback, stop, a rung above
    ``clip``), ``None`` for clips and for the quiet steps of recovery."""
    check = event.get("rollback_check")
    if check is not None:
        scored = "nothing" if check["scored_loss"] is None else f"{check['scored_loss']:.4g}"
        verdict = {
            "objective": "the objective moved, not the weights: rollback, back-off and level undone",
            "no_better": "the snapshot is no better than the diverged weights: they come back, the back-off stays",
        }.get(check["verdict"], "the weights diverged: the rollback stands")
        where = "" if index == 0 else f" optimizer {index}:"
        return (
            f"ExplosionGuard step {event['step']}:{where} rollback check: the snapshot scored {scored} on "
            f"{check['batches']} new batches (its loss {check['snapshot_loss']:.4g}, diverged "
            f"{check['diverged_loss']:.4g}): {verdict}"
        )
    actions = [a for a in event["actions"] if a != "clip"]
    backed_off = event["anomaly"] is not None and event["lr_scale"] < 1.0 and (
        event["level"] >= RUNGS.index("lr_backoff") or event["anomaly"] == "divergence"
    )
    climbed = event["level"] > event["previous_level"] and event["level"] > RUNGS.index("tight_clip")
    if not (actions or climbed or backed_off):
        return None
    what = "+".join(actions) if actions else f"level {event['rung']}"
    evidence = f"{event['anomaly']} ({event['evidence']} evidence)" if event["anomaly"] else "healthy"
    where = "" if index == 0 else f" optimizer {index}:"
    lr = f", lr x {event['lr_scale']:.3g}" if event["lr_scale"] != 1.0 else ""
    tail = " (further skips are counted in the summary)" if event["actions"] == ["skip"] else ""
    return f"ExplosionGuard step {event['step']}:{where} {what} on {evidence}, level {event['rung']}{lr}{tail}"
