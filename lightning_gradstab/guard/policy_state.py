"""The policy's saved state: its counters, the layout version of ``ExplosionPolicy.state_dict()`` and how an older
layout is brought up to date.

Everything the ladder, the detection and the rollback check count between steps lives in one :class:`Counters`
record, shared by the parts of :class:`~lightning_gradstab.guard.ladder.ExplosionPolicy` and saved as one dict:
the ``"counters"`` of its state. The ranges a loaded state must respect are checked by
:func:`lightning_gradstab.state_checks.policy_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Counters:
    """What the policy counts between steps: its place on the ladder, the snapshot schedule, the loss rules'
    switches, the rollback check in progress, and how often each anomaly and action happened."""

    steps: int = 0
    level: int = 0
    anomalies_at_level: float = 0.0  # a leaky bucket: each healthy step drains budget / healthy_steps_to_deescalate
    healthy_streak: int = 0
    steps_since_snapshot: int = 0
    has_snapshot: bool = False
    snapshot_step: int = 0
    lr_scale: float = 1.0
    lr_ceiling: float = 1.0
    lr_ceiling_absolute: float | None = None  # the largest learning rate the evidence supports, when lr is known
    lr_ceiling_hold: int = 0  # steps the lowered ceiling holds before its rate is tried again
    lr_ceiling_lowered_step: int = 0  # the step the ceiling was last lowered at
    lr_ceiling_raised_step: int | None = None  # the step it was last raised at (None: never)
    events_recorded: int = 0
    gradient_anomaly_streak: int = 0  # consecutive gradient-only anomalies while the loss was not rising
    recent_skips: float = 0.0  # loss-spike skips, a leaky count over a healthy_steps_to_deescalate horizon
    loss_rules_off: str | None = None  # why the loss rules stopped judging this run (None: they judge)
    check_steps_left: int = 0  # steps still scoring the snapshot after a divergence's rollback
    check_loss_total: float = 0.0  # the losses of those steps, summed ...
    check_loss_squares: float = 0.0  # ... their squares summed ...
    check_losses: int = 0  # ... and counted
    check_snapshot_loss: float = 0.0  # the smoothed loss when the snapshot was taken (l_s)
    check_diverged_loss: float = 0.0  # the smoothed loss at the divergence verdict (l_d)
    check_rise: float = 0.0  # how far l_d lay above the lowest smoothed loss: the rise that made the verdict
    objective_shifts: int = 0  # rollback checks that found the objective, not the weights, had moved
    divergence_off: str | None = None  # why divergence is no longer judged (None: it is)
    first_loss: float | None = None  # the first loss learned: where the run began, the scale of its progress
    skipped_spike_loss: float | None = None  # the loss of the step just skipped as a loss spike (None: it was not)
    outside_write_step: int | None = None  # the last step before which the weights were written from outside
    counts: dict[str, int] = field(default_factory=dict)
    first_anomaly_steps: dict[str, int] = field(default_factory=dict)

    def count(self, name: str) -> None:
        """One more ``name`` (an anomaly or an action) in :attr:`counts`."""
        self.counts[name] = self.counts.get(name, 0) + 1

    def assign(self, other: Counters) -> None:
        """Take every value of ``other`` (a loaded state): the policy's parts share this record, so it is updated
        in place, never replaced."""
        for item in fields(self):
            setattr(self, item.name, getattr(other, item.name))


STATE_VERSION = 11
"""Layout version of :meth:`~lightning_gradstab.guard.ladder.ExplosionPolicy.state_dict` (3: loss statistics and
trend, snapshot step; 4: log-space loss statistics, the regime and skip-bound counters, why the loss rules are off;
5: the rollback check's counters and why divergence is off; 6: the run's first loss; 7: the ceiling's hold; 8: the
loss of a step just skipped as a loss spike; 9: the loss trend's recent losses; 10: the step of the last write to
the weights from outside the optimizer; 11: the weights' norm at the loss trend's lowest value)."""

READABLE_VERSIONS = (3, 4, 5, 6, 7, 8, 9, 10, STATE_VERSION)
"""State versions :meth:`~lightning_gradstab.guard.ladder.ExplosionPolicy.load_state_dict` resumes from (older ones
gain what they lack, fresh)."""


def upgraded_policy_state(state: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """``state`` of an older readable version with the parts added since taken from a fresh policy's
    ``template`` (the current version's state comes back as it is)."""
    if state.get("version") == STATE_VERSION:
        return state
    counters = state.get("counters")
    if isinstance(counters, dict):
        counters = {**template["counters"], **counters}
    upgraded = {**template, **state, "counters": counters, "version": STATE_VERSION}
    trend = state.get("loss_trend")
    version = state.get("version")
    if isinstance(trend, dict) and isinstance(version, int):
        # version 10 and older keep no weight norm at the lowest loss (0: not measured, so no evidence of weight
        # growth until the next lowest); version 8 and older no recent losses either: the next ones fill them
        added = {"weight_norm_at_lowest": 0.0, **({"recent": []} if version <= 8 else {})}
        upgraded["loss_trend"] = {**added, **trend}
    return upgraded

