"""The snapshot schedule: when the state before a step is worth keeping for a rollback, and the statistics that
describe the snapshot (restored with it, so that a rolled-back run is judged as it was then).

The snapshot itself (weights, optimizer state, loss scale) is the adapter's
(:class:`~lightning_gradstab.guard.snapshot.RollbackSnapshot`); :class:`SnapshotSchedule` only says when to take
one (``Decision.snapshot``) and keeps the policy's side of it.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_gradstab.guard.config import RUNGS, PolicyConfig
from lightning_gradstab.guard.detect import LOSS_HORIZON_STEPS, Detector
from lightning_gradstab.guard.policy_state import Counters
from lightning_gradstab.running import LossTrend

SNAPSHOT_HEALTHY_STREAK = 10
"""Consecutive healthy steps before a refreshed snapshot is taken: a state the guard is acting on is not one."""


class SnapshotSchedule:
    """When to take a snapshot, and the statistics and loss trend of the last one taken.

    Args:
        config: ``snapshot_every``, ``warmup_steps`` and whether the ``rollback`` rung is allowed.
        counters: the policy's counters, shared (the snapshot's step, the healthy steps since it).
        detector: the policy's detection: its statistics are saved with a snapshot and restored with a rollback.
        base_level: the level the ladder rests at.
    """

    def __init__(self, config: PolicyConfig, counters: Counters, detector: Detector, base_level: int) -> None:
        self.config = config
        self.counters = counters
        self.detector = detector
        self.base_level = base_level
        self.statistics_at_snapshot: dict[str, Any] | None = None
        self.trend_at_snapshot: dict[str, Any] | None = None

    def due(self, anomaly: str | None) -> bool:
        """Whether the state before this step is a snapshot worth keeping: the initial state at least, then a
        healthy one every :meth:`interval` steps, never while the guard is acting or the loss is rising."""
        state, config = self.counters, self.config
        return config.allows("rollback") and (
            (not state.has_snapshot and (anomaly is None or state.steps == 1))
            or (
                anomaly is None
                and (
                    state.steps_since_snapshot >= self.interval()
                    and state.healthy_streak >= SNAPSHOT_HEALTHY_STREAK
                    and state.level < RUNGS.index("rollback")
                    and self.detector.loss_near_lowest()
                )
            )
        )

    def interval(self) -> int:
        """Healthy steps between snapshots: ``snapshot_every``, and early in a run half the steps so far
        (see :data:`SNAPSHOT_HEALTHY_STREAK`): a rollback discards at most about half of the run's progress."""
        every = self.config.resolved("snapshot_every")
        return min(every, max(SNAPSHOT_HEALTHY_STREAK, self.counters.steps // 2))

    def loss(self) -> float:
        """The smoothed loss the snapshot was taken at (``l_s``; nan when it has none)."""
        if self.trend_at_snapshot is None:
            return math.nan
        trend = LossTrend(LOSS_HORIZON_STEPS)
        trend.load_state_dict(self.trend_at_snapshot)
        return trend.smoothed

    def below(self, diverged_loss: float | None) -> bool:
        """Whether rolling back can lower the loss: the snapshot was taken at a smoothed loss below the diverged
        one. A snapshot older than the run's progress (the initial weights of a run that has since learned and then
        met harder data) scores at least what it scored then: restoring it would discard the progress and raise
        the loss. Without a loss to compare, a rollback is allowed as before."""
        snapshot_loss = self.loss()
        if diverged_loss is None or not math.isfinite(snapshot_loss) or not math.isfinite(diverged_loss):
            return True
        return snapshot_loss < diverged_loss

    def keep_bookkeeping(self, anomaly: str | None, snapshot: bool) -> None:
        """Remember the statistics that describe a new snapshot, and count the healthy steps since the last."""
        state = self.counters
        if snapshot:
            state.has_snapshot, state.steps_since_snapshot, state.snapshot_step = True, 0, state.steps
            # this step's gradient and loss were computed on the snapshot's weights: they describe it
            self.statistics_at_snapshot = self.detector.statistics_state()
            self.trend_at_snapshot = self.detector.loss_trend.state_dict()
        elif anomaly is None:
            state.steps_since_snapshot += 1
        if (  # a snapshot taken in the warm-up: a rollback restores the first statistics since that can judge
            self.statistics_at_snapshot is not None
            and self.statistics_at_snapshot["statistics"]["count"] < self.config.warmup_steps
            and state.has_snapshot
            and anomaly is None
            and state.level <= self.base_level
            and self.detector.statistics.warmed_up
        ):
            self.statistics_at_snapshot = self.detector.statistics_state()

    def forget(self) -> None:
        """The adapter has no snapshot (e.g. resumed from a checkpoint without one): request a new one."""
        self.counters.has_snapshot, self.counters.steps_since_snapshot = False, 0

    def restore_statistics(self) -> None:
        """After a rollback the weights are the snapshot's again: so are the statistics that describe them."""
        self.detector.growth.clear()
        if self.trend_at_snapshot is not None:
            self.detector.loss_trend.load_state_dict(self.trend_at_snapshot)
        if self.statistics_at_snapshot is not None:
            self.detector.load_statistics(self.statistics_at_snapshot)
