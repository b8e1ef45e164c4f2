"""The rollback check: after a divergence's rollback, the snapshot's weights are scored on new batches before the
rollback is trusted, and a rollback that cannot have helped is undone.

:class:`RollbackCheck` keeps the state a divergence verdict changes aside (:meth:`RollbackCheck.ladder_state`),
scores the :data:`ROLLBACK_CHECK_STEPS` skipped steps after the rollback and concludes: ``"keep"`` (the weights
were the damage) or ``"undo"`` (the objective moved, or the snapshot scores no better than the diverged weights).
:class:`~lightning_gradstab.guard.ladder.ExplosionPolicy` starts it and turns each of its steps into a
:class:`~lightning_gradstab.guard.decision.Decision`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from lightning_gradstab.guard.detect import LOSS_HORIZON_STEPS, Detector, Observation
from lightning_gradstab.guard.policy_state import Counters
from lightning_gradstab.running import LossTrend

ROLLBACK_CHECK_STEPS = 4
"""Batches the snapshot's weights are scored on after a divergence's rollback, before the rollback is trusted.

A divergence says the smoothed loss rose; it cannot say whether the weights got worse or the objective got harder
(a curriculum's next stage, a loss term whose weight is scheduled up, a policy whose returns changed). The snapshot
answers it, on new batches: if the weights were the damage, the snapshot's weights score what they scored when
it was taken (``l_s``); if the objective moved, every weights' loss rose with it, the snapshot's by about as much
as the diverged weights' rose above their lowest smoothed loss (the rise ``r`` that made the verdict), or more.
The guard rolls back, skips the next ``ROLLBACK_CHECK_STEPS`` steps while their losses score the snapshot, and keeps
the rollback unless the mean lies above the midpoint ``l_s + r / 2`` (the likelihood-ratio test between two
equal-variance means). The divergence margin is at least :data:`~lightning_gradstab.guard.detect.LOSS_NOISE_SIGMAS`
(3) per-step loss standard deviations ``s``, so the midpoint lies >= 1.5 ``s`` from either mean; the mean of 4
batches has a standard deviation of ``s / 2``: the midpoint is >= 3 standard errors from either hypothesis, a wrong
verdict about once in 700 checks. An objective that moved undoes the rollback (the weights of the divergence step
come back), the back-off and the level, and the loss is judged from its new level.

A snapshot taken above the lowest loss (``l_s`` closer to the diverged ``l_d`` than ``r``) must also score below
``(l_s + l_d) / 2``: one that scores no better than the diverged weights is no rescue, and its rollback is undone
while the back-off stays (``no_better``). A divergence never rolls back to a snapshot whose own ``l_s`` is not
below ``l_d`` (the initial weights of a run that learned, then met harder data)."""

OBJECTIVE_SHIFTS_TO_TRUST = 3
"""Rollback checks that found a moved objective after which divergence is no longer judged in this run.

Three independent paired checks (each wrong about once in 700) that found the loss rising with the objective, not
with the weights, say the loss's level follows a schedule or a curriculum by design: its rises are not evidence of
damage, and each further check would skip :data:`ROLLBACK_CHECK_STEPS` batches for nothing. Loss spikes (one batch
far outside the running loss) are still judged."""

LADDER_COUNTERS = (
    "level", "anomalies_at_level", "healthy_streak", "lr_scale", "lr_ceiling", "lr_ceiling_absolute",
    "lr_ceiling_hold", "lr_ceiling_lowered_step", "lr_ceiling_raised_step",
)
"""The counters a divergence verdict changes and an undone rollback check puts back."""


class RollbackCheck:
    """The check of one divergence's rollback at a time (see :data:`ROLLBACK_CHECK_STEPS`).

    Its progress (the steps left, the losses scored, the snapshot's and the diverged loss) is in the policy's
    shared ``counters`` and travels in checkpoints; the state kept aside does not (a check cut short by a resume
    lets the rollback stand).

    Args:
        counters: the policy's counters, shared.
        detector: the policy's detection, whose statistics an undone rollback puts back.
        base_level: the level the ladder rests at (the level recorded before a first check concludes).
    """

    def __init__(self, counters: Counters, detector: Detector, base_level: int) -> None:
        self.counters = counters
        self.detector = detector
        self.before: dict[str, Any] | None = None  # what an undone rollback check puts back
        self.level_at_conclusion = base_level
        self.last: dict[str, Any] | None = None
        """The last rollback check's numbers: ``snapshot_loss``, ``diverged_loss``, ``scored_loss``,
        ``scored_spread`` (their sample standard deviation), ``batches`` and ``verdict`` (``"weights"``: the
        rollback stood; ``"objective"``: the objective moved, and it was undone)."""

    def ladder_state(self) -> dict[str, Any]:
        """What a rollback check that finds a moved objective puts back: the level, the back-off, the ceilings
        and every statistic as they were before the divergence verdict."""
        state, detector = self.counters, self.detector
        return copy.deepcopy(
            {
                "counters": {name: getattr(state, name) for name in LADDER_COUNTERS},
                "statistics": detector.statistics_state(),
                "loss_trend": detector.loss_trend.state_dict(),
                "growth": detector.growth.state_dict(),
            }
        )

    def start(self, before: dict[str, Any], loss: float) -> str | None:
        """Begin the check of a divergence's rollback (see :data:`ROLLBACK_CHECK_STEPS`); ``"start"``, or
        ``None`` when the snapshot has no loss to compare with. ``before``: the :meth:`ladder_state` from before
        the verdict; ``loss``: the loss the verdict learned."""
        state = self.counters
        snapshot_loss = self.detector.loss_trend.smoothed  # the rollback restored the trend the snapshot was taken with
        if not math.isfinite(snapshot_loss):
            return None
        trend = LossTrend(LOSS_HORIZON_STEPS)
        trend.load_state_dict(before["loss_trend"])
        state.check_snapshot_loss, state.check_diverged_loss = snapshot_loss, trend.smoothed_with(loss)
        state.check_rise = state.check_diverged_loss - trend.lowest
        state.check_steps_left, state.check_losses = ROLLBACK_CHECK_STEPS, 0
        state.check_loss_total = state.check_loss_squares = 0.0
        self.before = before
        return "start"

    def abandon(self) -> None:
        """The adapter could not keep the current state aside: the rollback stands, with its back-off."""
        if self.counters.check_steps_left > 0:
            self.counters.check_steps_left = 0
            self.before = None
            self.counters.count("rollback_check_unavailable")

    def cut_short(self) -> None:
        """A resumed policy: the state kept aside is not in a checkpoint, so a check in progress lets the rollback
        stand."""
        self.counters.check_steps_left = 0
        self.before = None

    def score(self, observation: Observation) -> str:
        """One step of the check: its loss scores the snapshot's weights on a new batch. ``"score"`` while steps
        are left, then the verdict's ``"keep"`` or ``"undo"``."""
        state = self.counters
        loss = observation.loss
        if loss is not None and math.isfinite(loss) and not observation.nonfinite:
            state.check_loss_total += loss
            state.check_loss_squares += loss * loss
            state.check_losses += 1
        state.check_steps_left -= 1
        state.count("rollback_check")
        return "score" if state.check_steps_left else self._conclude()

    def _conclude(self) -> str:
        """``"undo"`` or ``"keep"``: see :data:`ROLLBACK_CHECK_STEPS` and
        :data:`~lightning_gradstab.guard.detect.LOSS_NOISE_SIGMAS`.

        The rollback is undone when the snapshot scored the new batches more than half the rise that made the
        divergence above its own smoothed loss (the objective moved): the undo restores the ladder and the
        statistics from before the divergence and judges the loss from its new level. It is also undone, with
        the back-off kept, when the snapshot scored closer to the diverged loss than to its own (``no_better``).
        """
        state = self.counters
        before, self.before = self.before, None
        self.level_at_conclusion = state.level
        count = state.check_losses
        scored = state.check_loss_total / count if count else math.nan
        spread = 0.0
        if count >= 2:  # the unbiased sample standard deviation of the scored losses
            spread = math.sqrt(max(0.0, (state.check_loss_squares - count * scored * scored) / (count - 1)))
        rise = state.check_rise
        # the rollback pays only if the snapshot scores closer to its own loss than to the diverged weights' loss:
        # with l_s at the lowest loss the two coincide; a snapshot taken above the lowest must beat a nearer mark
        gain = min(rise, state.check_diverged_loss - state.check_snapshot_loss)
        verdict = "weights"
        if before is not None and count and scored > state.check_snapshot_loss + 0.5 * rise:
            verdict = "objective"
        elif before is not None and count and scored > state.check_snapshot_loss + 0.5 * gain:
            verdict = "no_better"
        self.last = {
            "snapshot_loss": state.check_snapshot_loss,
            "diverged_loss": state.check_diverged_loss,
            "rise": rise,
            "scored_loss": scored if math.isfinite(scored) else None,
            "scored_spread": spread,
            "batches": count,
            "verdict": verdict,
        }
        if verdict == "weights" or before is None:
            return "keep"
        if verdict == "no_better":
            # the snapshot cannot be told from the diverged weights: they come back with their statistics, the
            # divergence's back-off stays (the rise is still unexplained), and the loss is judged from its level
            counters = {name: getattr(state, name) for name in LADDER_COUNTERS}
            self._load_ladder_state(before)
            for name, value in counters.items():
                setattr(state, name, value)
            self.detector.restart_loss_trend()
            state.count("rollback_no_better")
            return "undo"
        self._load_ladder_state(before)
        # the objective's new level is the reference from now on: the trend starts afresh
        # (its smoothed value still lags, and a reference taken from it would call the rest of a step a rise)
        self.detector.restart_loss_trend()
        state.objective_shifts += 1
        state.count("objective_shift")
        if state.objective_shifts >= OBJECTIVE_SHIFTS_TO_TRUST and state.divergence_off is None:
            state.divergence_off = (
                f"{state.objective_shifts} rollback checks found the loss rising with its objective (a schedule or "
                "a curriculum), not with the weights"
            )
            state.count("divergence_off")
        return "undo"

    def _load_ladder_state(self, saved: dict[str, Any]) -> None:
        for name, value in saved["counters"].items():
            setattr(self.counters, name, value)
        self.detector.load_statistics(saved["statistics"])
        self.detector.loss_trend.load_state_dict(saved["loss_trend"])
        self.detector.growth.load_state_dict(saved["growth"])
