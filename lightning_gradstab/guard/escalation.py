"""Escalation: where on the ladder the guard stands, and how it moves there.

An anomaly climbs as far as its evidence may reach (:data:`~lightning_gradstab.guard.config.DAMAGE_EVIDENCE`) and
the rungs' budgets allow; a divergence goes to ``lr_backoff`` at once; ``healthy_steps_to_deescalate`` healthy steps
in a row descend one rung. The rungs and their budgets are described in :mod:`lightning_gradstab.guard.ladder`, whose
:class:`~lightning_gradstab.guard.ladder.ExplosionPolicy` decides what the level means for each step.
"""

from __future__ import annotations

from lightning_gradstab.guard.backoff import Backoff
from lightning_gradstab.guard.config import (
    GRADIENT_ONLY_EVIDENCE,
    RUNGS,
    SCALE_EVIDENCE,
    SKIP_ONLY_EVIDENCE,
    PolicyConfig,
)
from lightning_gradstab.guard.policy_state import Counters


def highest_rung(anomaly: str) -> int:
    """The highest level ``anomaly``'s evidence may escalate to (see
    :data:`~lightning_gradstab.guard.config.DAMAGE_EVIDENCE`)."""
    if anomaly in GRADIENT_ONLY_EVIDENCE:
        return RUNGS.index("tight_clip")
    if anomaly in SKIP_ONLY_EVIDENCE:
        return RUNGS.index("skip")
    return RUNGS.index("stop")


class Escalation:
    """The level on the ladder and the budget used at it, kept in the policy's shared ``counters`` (``level``,
    ``anomalies_at_level``, ``healthy_streak``).

    Args:
        config: ``max_rung``, the budgets and ``healthy_steps_to_deescalate``.
        counters: the policy's counters, shared.
        backoff: the learning-rate back-off a divergence and a healthy step move.
        base_level: the level the ladder rests at (``clip``, or ``observe`` when that is the highest rung).
    """

    def __init__(self, config: PolicyConfig, counters: Counters, backoff: Backoff, base_level: int) -> None:
        self.config = config
        self.counters = counters
        self.backoff = backoff
        self.base_level = base_level

    def move(self, anomaly: str | None, lr: float | None, benign: bool = False) -> None:
        """Escalate on an anomaly as far as its evidence allows, de-escalate after a healthy stretch, back off at
        once on a divergence.

        Gradient evidence climbs to ``tight_clip`` at most and a loss spike to ``skip`` at most (see
        :data:`~lightning_gradstab.guard.config.DAMAGE_EVIDENCE`): an anomaly at its ceiling keeps the level where it
        is, so repeats of the same kind of evidence never reach a rung that costs more than the evidence justifies. A
        norm that is only unusual for its history (a spike, growth, drift) while the loss is ``benign`` (falling, or not
        an objective the rules judge) stays at ``clip``: the adaptive clip already caps each unusual step, and clipping
        *every* step to the typical norm changes the training of a run that shows no damage (a GAN's players, a model
        leaving a plateau). An oversized SGD step is measured against the weights, not the history: it may still
        tighten.
        """
        highest = highest_rung(anomaly) if anomaly is not None else 0
        if anomaly in SCALE_EVIDENCE and benign:
            highest = RUNGS.index("clip")
        if anomaly is None:
            self._on_healthy_step(lr)
        elif anomaly == "divergence":
            self._on_divergence(lr)
        elif self.counters.level < min(highest, self.config.max_level):
            self._escalate(anomaly)
        else:
            self.counters.healthy_streak = 0

    def withdraw_loss_verdicts(self) -> None:
        """Take back what divergence verdicts did to the ladder once the loss turns out not to be an objective.

        A loss that can be negative (a policy gradient with a baseline, a log-ratio) was judged as one bounded
        below by zero until it showed its sign; a rise it made before that is no evidence of damage, so the
        back-off, the lowered ceiling and the level it caused are withdrawn. Only when the loss was the sole
        evidence that ever acted above clipping: a non-finite step or a collapsed loss scale keeps the ladder.
        """
        state = self.counters
        counts = state.counts
        if not counts.get("divergence") or counts.get("nonfinite") or counts.get("loss_scale_collapse"):
            return
        state.level, state.anomalies_at_level = self.base_level, 0.0
        self.backoff.withdraw()
        state.count("loss_verdicts_withdrawn")

    def _on_healthy_step(self, lr: float | None) -> None:
        state, config = self.counters, self.config
        state.healthy_streak += 1
        # a budget is a rate, not a lifetime count: anomalies as sparse as the healthy band's (ZClip clips ~1 % of
        # steps) drain away and never escalate; a burst of more than `budget` within about
        # `healthy_steps_to_deescalate` steps does
        drain = config.budget(state.level) / config.healthy_steps_to_deescalate
        state.anomalies_at_level = max(0.0, state.anomalies_at_level - drain)
        self.backoff.recover(lr)
        if state.healthy_streak >= config.healthy_steps_to_deescalate:
            state.healthy_streak = 0
            state.anomalies_at_level = 0
            if state.level > self.base_level:
                state.level -= 1
                state.count("deescalate")

    def _on_divergence(self, lr: float | None) -> None:
        # the step size is too large: back off at once, and hold the diverging rate off for a stretch
        state, config = self.counters, self.config
        state.healthy_streak = 0
        self.backoff.at_once(lr)
        target = min(RUNGS.index("lr_backoff"), config.max_level)
        if state.level < target:
            state.level, state.anomalies_at_level = target, 0
            state.count("escalate")

    def _escalate(self, anomaly: str) -> None:
        state, config = self.counters, self.config
        state.healthy_streak = 0
        skip_level = RUNGS.index("skip")
        if anomaly in ("nonfinite", "loss_scale_collapse") and state.level < skip_level <= config.max_level:
            state.level, state.anomalies_at_level = skip_level, 0  # clipping cannot repair these
            state.count("escalate")
        state.anomalies_at_level += 1
        if state.anomalies_at_level > config.budget(state.level) and state.level < config.max_level:
            state.level += 1
            state.anomalies_at_level = 1
            state.count("escalate")
