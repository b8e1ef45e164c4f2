"""The guard's rollback snapshots and step buffers, and the rule that every rank restores or none does.

:class:`GuardSnapshots` owns the rollback snapshot (taken every ``snapshot_every`` healthy steps), the state of
a divergence step kept aside while its rollback is checked, and the module buffers as they were before the
step's forward (so a skipped step leaves no trace in running statistics). A rollback is carried out only when
every rank holds a usable snapshot, agreed on in one more collective on rollback steps only; otherwise every
rank skips the step instead, so the replicas stay identical. Kept apart from ``guard.py`` because it is the
guard's whole dealing with saved state: files, their leftovers, checkpoints and the agreement across ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_gradstab.guard.config import RUNGS
from lightning_gradstab.guard.decision import Decision
from lightning_gradstab.guard.snapshot import RollbackSnapshot
from lightning_gradstab.guard.snapshot_budget import validate_snapshot_options
from lightning_gradstab.guard.step_buffers import StepBuffers
from lightning_gradstab.running import RankReduction

# on rollback steps: every rank's snapshot verified, and the state of a checked rollback kept aside
_SNAPSHOT_AGREEMENT = RankReduction([("usable", "min"), ("set_aside", "min")])

SNAPSHOT_DIRNAME = "gradstab_rollback"
"""Folder under the log directory that holds disk rollback snapshots when ``snapshot_dir`` is not given."""

_OPTION_DEFAULTS: dict[str, Any] = {
    "snapshot_keep": "weights+optimizer",
    "snapshot_location": "memory",
    "snapshot_max_bytes": "auto",
    "snapshot_dir": None,
}

WarnOnce = Callable[[str, str], None]
"""``warn_once(key, message)``: the guard's one warning per ``key``."""


class GuardSnapshots:
    """The rollback snapshot, the state kept aside during a rollback check, and the step's module buffers.

    Example::

        snapshots = GuardSnapshots("weights+optimizer", "memory", "auto", None, max_rung="stop")
        snapshots.ready  # False: none taken yet
    """

    def __init__(
        self,
        keep: Literal["weights", "weights+optimizer"],
        location: Literal["memory", "disk"],
        max_bytes: int | Literal["auto"] | None,
        directory: str | os.PathLike[str] | None,
        *,
        max_rung: str,
    ) -> None:
        """The guard's ``snapshot_*`` options, checked (and named so in errors); setting one is a contradiction
        when ``max_rung`` is below ``"rollback"``."""
        validate_snapshot_options(keep, location, max_bytes, None, prefix="snapshot_")
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"`snapshot_dir` must be a path (str or os.PathLike) or None, got {directory!r}")
        given = {"snapshot_keep": keep, "snapshot_location": location, "snapshot_max_bytes": max_bytes,
                 "snapshot_dir": directory}
        if RUNGS.index(max_rung) < RUNGS.index("rollback"):
            for option, value in given.items():
                if value != _OPTION_DEFAULTS[option]:
                    raise ValueError(
                        f"`{option}`={value!r} configures rung 'rollback', which is above `max_rung`={max_rung!r}; "
                        f"raise `max_rung` to at least 'rollback' or drop `{option}`"
                    )
        self._directory_given = directory is not None
        self.rollback = RollbackSnapshot(keep, location, max_bytes, directory)
        # the state of a divergence step, kept aside while its rollback is checked (policy.ROLLBACK_CHECK_STEPS):
        # put back when the check finds that the objective moved, not the weights
        self.set_aside = RollbackSnapshot(keep, location, max_bytes, directory)
        self._buffers = StepBuffers()  # buffers as before this step's forward: a skip leaves no trace
        self._buffers_saved = False  # this optimizer step's buffers are saved (its first forward ran)
        self._warned_unavailable = False

    def new_run(self) -> None:
        """A new run (not a resumed one): no snapshot, no saved buffers, the warnings said again."""
        self._buffers.clear()
        self._buffers_saved = False
        self._warned_unavailable = False
        self.rollback.new_run()
        self.set_aside.new_run()

    def start_fit(self, log_dir: Path, local_processes: int) -> None:
        """Where disk snapshots go (``gradstab_rollback`` in ``log_dir`` unless a folder was given), how many
        ranks share this host's "auto" bound, and a warning naming files left by processes that are gone."""
        if not self._directory_given:
            self.rollback.directory = self.set_aside.directory = log_dir / SNAPSHOT_DIRNAME
        self.rollback.local_processes = self.set_aside.local_processes = local_processes
        if self.rollback.requested_location == "disk" or self.rollback.max_bytes is not None:
            leftover = self.rollback.leftover_files()
            if leftover:  # never deleted here: only the run that wrote a file deletes it
                rank_zero_warn(
                    f"ExplosionGuard: {len(leftover)} rollback snapshot file(s) left by processes that are gone (a "
                    f"SIGKILL or a crash) in {str(leftover[0].parent)!r}: {', '.join(p.name for p in leftover[:3])}"
                    f"{' ...' if len(leftover) > 3 else ''}; delete them to free the disk space."
                )

    @property
    def ready(self) -> bool:
        """Whether this rank holds a snapshot a restore can load now (a host-side check: no device sync).

        A disk write still in flight counts as not ready: its outcome is not known yet, and a rank whose write
        then failed could not restore while the others did. A disk snapshot's file must still be the one
        written, with its size (a ``stat``); its checksum is checked on a rollback step.
        """
        return self.rollback.usable

    def save_buffers(self, pl_module: pl.LightningModule) -> None:
        """Keep the module's buffers at the first forward of an optimizer step."""
        if not self._buffers_saved:
            self._buffers.save(pl_module)
            self._buffers_saved = True

    def end_step(self, skipped: bool, rolled_back: bool) -> None:
        """A skipped step puts back what its forwards wrote into buffers (a rollback restored them already)."""
        if skipped and not rolled_back:
            self._buffers.restore()
        self._buffers_saved = False  # the next batch starts a new optimizer step

    def act(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        decision: Decision,
        scaler: Any,
        everywhere: bool,
        abandon_check: Callable[[], None],
        forget_snapshots: Callable[[], None],
    ) -> bool:
        """Carry out the decision's snapshot, rollback and rollback-check parts; whether the weights went back.

        ``everywhere``: every rank holds a usable snapshot (from the step's reduction). ``abandon_check`` ends
        the policy's rollback check when its state cannot be kept aside; ``forget_snapshots`` makes every policy
        take a new snapshot at the next healthy step, after a rollback that could not be carried out.
        """
        if decision.snapshot:
            self.rollback.take(pl_module, trainer.optimizers, scaler, step=decision.step)
        rolled_back = False
        if decision.rollback:
            rolled_back = self._roll_back(trainer, pl_module, decision, scaler, everywhere, abandon_check)
            if not rolled_back:
                forget_snapshots()
        if decision.rollback_check in ("undo", "keep"):
            self._end_rollback_check(trainer, pl_module, decision, scaler)
            rolled_back = decision.rollback_check == "undo"
        return rolled_back

    def _roll_back(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        decision: Decision,
        scaler: Any,
        everywhere: bool,
        abandon_check: Callable[[], None],
    ) -> bool:
        checked = decision.rollback_check == "start"
        if checked and everywhere:  # the divergence step's own state, in case the check undoes it
            self.set_aside.take(pl_module, trainer.optimizers, scaler, step=decision.step)
        # every rank restores or none does: one rank without a usable snapshot (a failed or unfinished disk
        # write, a file removed or corrupted) makes all of them skip the step instead, so the replicas stay
        # identical. The file's checksum and the model's structure are checked first, agreed on in one
        # more collective on rollback steps only (a decision every rank took alike)
        problem = self.rollback.problem(pl_module, trainer.optimizers) if everywhere else None
        set_aside = checked and everywhere and self.set_aside.available
        if everywhere and trainer.world_size > 1:
            agreed = _SNAPSHOT_AGREEMENT.reduce(
                {
                    "usable": torch.tensor(0.0 if problem else 1.0, device=pl_module.device),
                    "set_aside": torch.tensor(float(set_aside), device=pl_module.device),
                },
                distributed=True,
            )
            everywhere, set_aside = agreed["usable"] > 0, agreed["set_aside"] > 0
        if checked and not (set_aside and everywhere and problem is None):
            abandon_check()
            self.set_aside.close()
        if everywhere and problem is None:
            self.rollback.restore(pl_module, trainer.optimizers, scaler)
            self._buffers.resync()
            return True
        if not self._warned_unavailable:
            self._warned_unavailable = True
            rank_zero_warn(
                f"ExplosionGuard: step {decision.step} asks for a rollback but a rank holds no usable "
                "rollback snapshot (none taken yet, a disk write failed or is still in flight, it did not "
                "fit, its file was removed or changed, or it does not match the model"
                + (f": {problem}" if problem else "")
                + "); every rank skips the step instead (said once)."
            )
        return False

    def _end_rollback_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, decision: Decision, scaler: Any
    ) -> None:
        """Put the divergence step's state back when the check found that the objective moved (every rank or
        none, as a rollback), then drop it."""
        if decision.rollback_check == "undo":
            problem = self.set_aside.problem(pl_module, trainer.optimizers) if self.set_aside.usable else "gone"
            if trainer.world_size > 1:
                usable = torch.tensor(0.0 if problem else 1.0, device=pl_module.device)
                agreed = _SNAPSHOT_AGREEMENT.reduce(
                    {"usable": usable, "set_aside": usable}, distributed=True
                )["usable"] > 0
                problem = problem or (None if agreed else "not usable on every rank")
            if problem is None:
                self.set_aside.restore(pl_module, trainer.optimizers, scaler)
                self._buffers.resync()
            else:
                rank_zero_warn(
                    f"ExplosionGuard: step {decision.step}: the rollback check found that the objective moved, but "
                    f"the state kept aside cannot be put back ({problem}); training goes on from the snapshot."
                )
        self.set_aside.close()

    def load(self, saved: dict[str, Any], pl_module: pl.LightningModule, warn_once: WarnOnce) -> None:
        """Load a checkpoint's rollback snapshot, or drop it with one warning when it cannot be used."""
        try:  # the constructor's settings stay: a snapshot that does not fit them is dropped, not obeyed
            dropped = self.rollback.load_state_dict(saved)
        except ValueError as error:  # an older layout or a damaged one: a new snapshot is taken instead
            dropped = str(error)
        if dropped is not None:
            warn_once("checkpoint snapshot", f"ExplosionGuard: the checkpoint's rollback snapshot is not used "
                      f"({dropped}); a new one is taken at the next healthy step.")
        self.drop_unusable(pl_module, None, warn_once)  # the model is built; the optimizers come later

    def drop_unusable(self, pl_module: pl.LightningModule, optimizers: Any, warn_once: WarnOnce) -> None:
        """Drop a snapshot restored from a checkpoint that does not fit this model (a buffer added to the code
        since, another architecture) or these optimizers (``None``: not set up yet), with one warning: it is
        checked when loaded, not found out at the first rollback."""
        if self.rollback.location != "memory":
            return
        problem = self.rollback.problem(pl_module, optimizers)
        if problem is not None:
            self.rollback.close()
            warn_once(
                "checkpoint snapshot",
                f"ExplosionGuard: the checkpoint's rollback snapshot cannot be used ({problem}); it is dropped and "
                "a new one is taken at the next healthy step.",
            )

    def end_fit(self) -> None:
        """After fit: a memory snapshot stays (a checkpoint saved after fit carries it, so a run resumed from it
        rolls back alike); a disk one is not carried, so its file is written out (or its failure noted) and
        removed."""
        if self.rollback.location == "disk":
            self.rollback.close()
        self.set_aside.close()
        self._buffers.clear()
        self._buffers_saved = False

    def on_exception(self) -> None:
        """An error or a preemption: this run's disk snapshot file is deleted now (no later step of this process
        will use it); a memory one stays for a checkpoint written after the error."""
        if self.rollback.location != "memory":  # on disk, or none (a write that failed or was cut short)
            self.rollback.close()
        self.set_aside.close()
