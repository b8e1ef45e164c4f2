"""What the guard tells its adapter to do with one optimizer step: a :class:`Decision`.

:class:`~lightning_gradstab.guard.ladder.ExplosionPolicy` makes one per step, identically on every rank; the
Lightning adapter carries it out (clip, skip, scale the learning rate, roll back, stop, take a snapshot).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gradstab.guard.config import EVIDENCE, RUNGS


@dataclass(frozen=True)
class Decision:
    """What to do with the current step; the adapter carries it out identically on every rank.

    Attributes:
        step: optimizer steps seen by the policy, 1-based.
        level: ladder level after this step's escalation or de-escalation.
        anomaly: a key of :data:`~lightning_gradstab.guard.config.EVIDENCE` (``"spike"``, ``"loss_spike"``,
            ``"divergence"``, ...) or ``None`` for a healthy step.
        zscore: log-norm z-score of the raw norm (0 in warm-up or when non-finite).
        clip_threshold: the norm the step is clipped to (``inf`` when no clipping is armed).
        clip_coefficient: multiply every gradient by this (1.0: leave them alone).
        skip: drop this step's gradients so neither weights nor optimizer state change.
        lr_scale: learning-rate multiplier to apply around this step.
        rollback: restore the last healthy snapshot before skipping this step.
        stop: stop the run.
        snapshot: this step is healthy; take a rollback snapshot of the state *before* it.
        loss_zscore: z-score of the step's loss (0 without a loss or in warm-up).
        reset_loss_scale: the fp16 loss scale collapsed: set it back to the scaler's initial scale (its own
            growth, one doubling per 2000 clean steps, would take tens of thousands of steps).
        rollback_check: the rollback check (:data:`~lightning_gradstab.guard.rollback_check.ROLLBACK_CHECK_STEPS`):
            ``"start"`` (keep the current state aside, then roll back), ``"score"`` (a skipped step whose loss
            scores the snapshot), ``"undo"`` (the objective moved: put the state kept aside back) or ``"keep"``
            (the rollback stands: drop it); ``None`` outside a check.
    """

    step: int
    level: int
    anomaly: str | None
    zscore: float
    clip_threshold: float
    clip_coefficient: float = 1.0
    skip: bool = False
    lr_scale: float = 1.0
    rollback: bool = False
    stop: bool = False
    snapshot: bool = False
    loss_zscore: float = 0.0
    reset_loss_scale: bool = False
    rollback_check: str | None = None

    @property
    def rung(self) -> str:
        """Name of the level."""
        return RUNGS[self.level]

    @property
    def evidence(self) -> str | None:
        """What the anomaly was seen in: ``"gradient"``, ``"loss"``, ``"update"``, ``"loss scale"`` or ``None``."""
        return EVIDENCE.get(self.anomaly) if self.anomaly else None

    @property
    def actions(self) -> list[str]:
        """The interventions this decision makes, e.g. ``["clip"]`` or ``["rollback", "skip"]``."""
        names = []
        if self.clip_coefficient < 1.0 and not self.skip:
            names.append("clip")
        for name in ("rollback", "stop", "skip"):
            if getattr(self, name):
                names.append(name)
        if self.rollback_check == "undo":
            names.append("undo_rollback")
        return names
