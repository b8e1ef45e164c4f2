"""The escalation ladder: :class:`ExplosionPolicy`, the guard's policy as a pure state machine (no Lightning, no
tensors).

:class:`ExplosionPolicy` turns one :class:`~lightning_gradstab.guard.detect.Observation` per optimizer step (numbers
already reduced across ranks, so every rank computes the same thing) into one
:class:`~lightning_gradstab.guard.decision.Decision`. It composes the parts of the guard's policy, one module each:
what the step's evidence says (:mod:`~lightning_gradstab.guard.detect`), where on the ladder that puts the guard
(:mod:`~lightning_gradstab.guard.escalation`), the learning-rate back-off and its ceiling
(:mod:`~lightning_gradstab.guard.backoff`), when to take a snapshot
(:mod:`~lightning_gradstab.guard.snapshot_schedule`), the check of a divergence's rollback
(:mod:`~lightning_gradstab.guard.rollback_check`) and the event log (:mod:`~lightning_gradstab.guard.event_log`); what
the level means for the step (clip, skip, back off, roll back, stop) is decided here. The ladder, lowest rung first:

==  ==============  =====================================================================================
0   ``observe``     detect and log only
1   ``clip``        adaptive clipping: a spike is clipped to ``exp(mu + z_thr^2 / z * sigma)`` in log space
                    (ZClip's reciprocal rule), so larger spikes are pulled closer to the running mean; a loss
                    spike is skipped (clipping cannot undo what a bad batch does to Adam's moments)
2   ``tight_clip``  every step is clipped to ``tight_clip_ratio`` x the running typical norm
3   ``skip``        an anomalous step is skipped (the adapter drops its gradients)
4   ``lr_backoff``  additionally multiply the learning rate by ``backoff_factor``; it recovers by one factor
                    per ``lr_recovery_steps`` healthy steps, up to a ceiling below the scale that failed
5   ``rollback``    restore the last healthy snapshot of model and optimizer and skip the step
6   ``stop``        stop training (the adapter sets ``trainer.should_stop`` or raises)
==  ==============  =====================================================================================

A rung handles ``budget`` anomalous steps, a rate drained by every healthy step (``budget /
healthy_steps_to_deescalate`` each), so the sparse clips of a healthy run never add up; past it the next
rung takes over. ``healthy_steps_to_deescalate`` consecutive healthy steps drop one level and empty the
budget. Lower rungs stay active above them (a skipping guard still clips tightly). A non-finite gradient
cannot be clipped, so it jumps straight to the ``skip`` rung. Under an fp16 ``GradScaler`` a non-finite
step on *every* rank is an overflow the scaler already skips: it is counted, never escalated; non-finite
values on some ranks only are a rank-local fault (not an overflow) and are skipped everywhere. A step with
an exactly zero gradient carries no information and is not learned.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from lightning_gradstab.guard.backoff import MIN_LR_SCALE, Backoff
from lightning_gradstab.guard.config import DAMAGE_EVIDENCE, RUNGS, SKIP_ONLY_EVIDENCE, PolicyConfig
from lightning_gradstab.guard.decision import Decision
from lightning_gradstab.guard.detect import Detector, Observation
from lightning_gradstab.guard.escalation import Escalation
from lightning_gradstab.guard.event_log import EventLog
from lightning_gradstab.guard.policy_state import READABLE_VERSIONS, STATE_VERSION, Counters, upgraded_policy_state
from lightning_gradstab.guard.rollback_check import RollbackCheck
from lightning_gradstab.guard.snapshot_schedule import SnapshotSchedule
from lightning_gradstab.running import GrowthWindow, LogNormStatistics, LossTrend, RunningMoments
from lightning_gradstab.state_checks import POLICY_OPTIONAL, check_state, policy_rules

MAX_SKIP_FRACTION = 0.1
"""Largest fraction of recent steps (a ``healthy_steps_to_deescalate`` horizon) that loss spikes may skip.

A 6-sigma threshold on a well-estimated spread fires on a tiny fraction of batches; skipping more than one in ten
says the statistic is wrong for this loss (a heavy tail, a new regime), not that a tenth of the data is bad. Past
the bound a loss spike is clipped instead of skipped and the loss statistics learn it, so a run cannot be starved."""


class ExplosionPolicy:
    """The guard's brain: detection, escalation ladder, budgets, de-escalation, event log.

    The parts it composes share its counters (:attr:`state`): :attr:`detector` (the running statistics and the
    judgement of each step), :attr:`escalation` (the level), :attr:`backoff` (the learning-rate multiplier and its
    ceiling), :attr:`snapshots` (when to take a rollback snapshot), :attr:`rollback_check` (the check of a
    divergence's rollback) and :attr:`log` (the events).

    Args:
        config: thresholds and budgets (see :class:`~lightning_gradstab.guard.config.PolicyConfig`).
        max_events: events kept in the log (oldest dropped first; counts are never dropped).

    Example::

        policy = ExplosionPolicy(PolicyConfig(warmup_steps=5))
        for norm in [1.0, 1.2, 0.9, 1.1, 1.0, 1.05]:
            policy.step(Observation(norm))
        decision = policy.step(Observation(1e4))
        decision.clip_coefficient  # about 1e-4: the spike is clipped to the typical norm
    """

    def __init__(self, config: PolicyConfig | None = None, max_events: int = 10_000) -> None:
        self.config = config or PolicyConfig()
        self.max_events = max_events
        self.base_level = min(1, self.config.max_level)
        self.state = Counters(level=self.base_level)
        self.backoff = Backoff(self.config, self.state)
        self.escalation = Escalation(self.config, self.state, self.backoff, self.base_level)
        self.detector = Detector(self.config, self.state, self.base_level, self.escalation.withdraw_loss_verdicts)
        self.snapshots = SnapshotSchedule(self.config, self.state, self.detector, self.base_level)
        self.rollback_check = RollbackCheck(self.state, self.detector, self.base_level)
        self.log = EventLog(max_events)

    @property
    def level(self) -> int:
        """Current ladder level."""
        return self.state.level

    @property
    def steps(self) -> int:
        """Optimizer steps judged so far."""
        return self.state.steps

    @property
    def lr_scale(self) -> float:
        """The learning-rate multiplier the ladder holds now (1.0: no back-off in force)."""
        return self.state.lr_scale

    @property
    def events_recorded(self) -> int:
        """Events recorded since the start, kept or not (an incremental writer's position for :meth:`events_since`)."""
        return self.state.events_recorded

    @property
    def events(self) -> list[dict[str, Any]]:
        """The kept event log, oldest first (copies: editing them changes nothing); see
        :attr:`~lightning_gradstab.guard.event_log.EventLog.events` for the keys of an event."""
        return self.log.events

    def events_since(self, recorded: int) -> list[dict[str, Any]]:
        """Events recorded after the first ``recorded`` ones (those still kept), for incremental writers."""
        return self.log.latest(self.state.events_recorded - recorded)

    @property
    def worst_spikes(self) -> list[dict[str, Any]]:
        """The five most severe anomalies' events (non-finite first, then by z-score)."""
        return self.log.worst_spikes

    @property
    def counts(self) -> dict[str, int]:
        """How often each action and anomaly happened (``clip``, ``skip``, ``amp_overflow``, ...)."""
        return dict(self.state.counts)

    def count_action(self, name: str) -> None:
        """Count one action the guard took outside the ladder (QK-clip's ``attention_logit_cap``), so that the
        summary, the advice and a checkpoint carry it with the ladder's own counts."""
        self.state.count(name)

    @property
    def first_anomaly_steps(self) -> dict[str, int]:
        """The step at which each kind of anomaly was first seen."""
        return dict(self.state.first_anomaly_steps)

    @property
    def last_rollback_check(self) -> dict[str, Any] | None:
        """The last rollback check's numbers and verdict (see
        :attr:`~lightning_gradstab.guard.rollback_check.RollbackCheck.last`)."""
        return self.rollback_check.last

    @property
    def statistics(self) -> LogNormStatistics:
        """The running log-norm statistics spikes are judged against."""
        return self.detector.statistics

    @property
    def loss_statistics(self) -> RunningMoments:
        """The running per-step loss statistics (the loss's noise)."""
        return self.detector.loss_statistics

    @property
    def log_loss_statistics(self) -> LogNormStatistics:
        """The running log-loss statistics loss spikes are judged against."""
        return self.detector.log_loss_statistics

    @property
    def loss_trend(self) -> LossTrend:
        """The smoothed loss and its lowest value, which divergence is judged on."""
        return self.detector.loss_trend

    @property
    def growth(self) -> GrowthWindow:
        """The recent log-norms sustained growth is judged on."""
        return self.detector.growth

    @property
    def reference(self) -> LogNormStatistics | None:
        """The long-horizon healthy reference drift is judged against (``None``: drift detection off)."""
        return self.detector.reference

    @property
    def reference_norm(self) -> float:
        """The long-horizon healthy norm, ``exp`` of the reference's mean log-norm (``inf`` without one yet)."""
        return self.detector.reference_norm

    def drift(self) -> float:
        """Log of how far the fast typical norm lies above the long-horizon reference (0 until both exist)."""
        return self.detector.drift()

    # the names the policy's own tests reach its internals by, from before it was split into parts
    def _rise_margin(self) -> float:
        return self.detector.rise_margin()

    def _snapshot_loss(self) -> float:
        return self.snapshots.loss()

    @property
    def _trend_at_snapshot(self) -> dict[str, Any] | None:
        return self.snapshots.trend_at_snapshot

    @_trend_at_snapshot.setter
    def _trend_at_snapshot(self, trend: dict[str, Any] | None) -> None:
        self.snapshots.trend_at_snapshot = trend

    def step(self, observation: Observation) -> Decision:
        """Judge one optimizer step and decide what to do with it."""
        state = self.state
        state.steps += 1
        # the loss of the previous step if it was skipped as a loss spike: this step runs on the same weights
        skipped_spike_loss, state.skipped_spike_loss = state.skipped_spike_loss, None
        if state.check_steps_left > 0:
            return self._score_snapshot(observation)
        unjudged = self._unjudged(observation)
        if unjudged is not None:
            return unjudged
        judgement = self.detector.judge(observation, skipped_spike_loss)
        anomaly = judgement.anomaly
        previous_level, previous_lr_scale = state.level, state.lr_scale
        before_divergence = self.rollback_check.ladder_state() if anomaly == "divergence" else None
        lr = observation.lr if observation.lr is not None and observation.lr > 0 else None
        self.escalation.move(anomaly, lr, judgement.benign)
        adaptive_threshold, threshold, ceiling = self.detector.clip_thresholds(judgement, observation)
        coefficient = 1.0
        if not judgement.nonfinite and math.isfinite(threshold) and judgement.norm > threshold:
            coefficient = threshold / judgement.norm
        diverged_loss = None
        if anomaly == "divergence" and judgement.learned_loss is not None:
            diverged_loss = self.detector.loss_trend.smoothed_with(judgement.learned_loss)
        skip, rollback, stop = self._interventions(
            anomaly, previous_level, lr, diverged_loss, judgement.learned_loss if diverged_loss is not None else None
        )
        check = None
        if rollback and not stop and before_divergence is not None and judgement.learned_loss is not None:
            check = self.rollback_check.start(before_divergence, judgement.learned_loss)
        snapshot = self.snapshots.due(anomaly)
        if not judgement.nonfinite and not rollback:
            self.detector.learn(judgement, adaptive_threshold, skipped=skip)
        self.snapshots.keep_bookkeeping(anomaly, snapshot)

        decision = Decision(
            step=state.steps,
            level=state.level,
            anomaly=anomaly,
            zscore=judgement.zscore,
            clip_threshold=threshold,
            clip_coefficient=1.0 if skip else coefficient,
            skip=skip,
            lr_scale=1.0 if skip else state.lr_scale,
            rollback=rollback,
            stop=stop,
            snapshot=snapshot,
            loss_zscore=judgement.loss_zscore,
            reset_loss_scale=judgement.collapsed and self.config.allows("skip"),
            rollback_check=check,
        )
        if skip and anomaly == "loss_spike":
            state.skipped_spike_loss = judgement.loss
        actions = decision.actions
        for action in actions:
            state.count(action)
        if "clip" in actions and threshold == ceiling:
            state.count("max_norm")  # the ceiling, not an anomaly, set this clip
        if anomaly is not None:
            state.count(anomaly)
            state.first_anomaly_steps.setdefault(anomaly, state.steps)
        if anomaly is not None or decision.skip or state.level != previous_level or state.lr_scale != previous_lr_scale:
            self._record(decision, judgement.norm, previous_level, judgement.loss)
        return decision

    def _score_snapshot(self, observation: Observation) -> Decision:
        """One step of a rollback check: skipped, its loss scoring the snapshot's weights on a new batch."""
        state = self.state
        check = self.rollback_check.score(observation)
        decision = Decision(
            state.steps, state.level, None, 0.0, math.inf, skip=True, lr_scale=1.0, rollback_check=check
        )
        if check != "score":
            norm = observation.total_norm if not observation.nonfinite else math.inf
            self._record(decision, norm, self.rollback_check.level_at_conclusion, observation.loss)
        return decision

    def abandon_rollback_check(self) -> None:
        """The adapter could not keep the current state aside (no room, a failed write on some rank): the
        rollback stands as rollbacks did before the check existed, with its back-off."""
        self.rollback_check.abandon()

    def forget_snapshot(self) -> None:
        """The adapter has no snapshot (e.g. resumed from a checkpoint without one): request a new one."""
        self.snapshots.forget()

    def weights_changed(self) -> bool:
        """The weights were written between two optimizer steps by something other than the optimizer: a reset,
        pruning, a rewind, a load (the adapter tells, see :mod:`lightning_gradstab.callbacks._guard_writes`).
        ``True`` when the guard starts afresh from them.

        What the guard knows describes the weights before the change, and its snapshot is of them: the loss's jump
        would read as loss spikes to skip (the very steps that retrain a reset layer) and as a divergence to roll
        back, to the snapshot, undoing the user's change. So every running statistic restarts (the warm-up's
        rules judge the next steps), the snapshot is dropped (the next healthy step takes one) and a rollback check
        in progress ends with its rollback standing. The ladder's level and the learning-rate back-off stay:
        they are evidence about the learning rate, which the change did not touch.

        A write that comes back within ``warmup_steps`` steps of the previous one is part of how this run steps
        (a projection after every step: WGAN's weight clipping, a max-norm constraint), not an intervention: only
        the first of a series restarts the guard, the others are learned as any step is."""
        state = self.state
        previous, state.outside_write_step = state.outside_write_step, state.steps
        if previous is not None and state.steps - previous < self.config.warmup_steps:
            return False
        state.count("weights_changed")
        self.detector.restart()
        state.first_loss, state.skipped_spike_loss = None, None
        state.gradient_anomaly_streak, state.recent_skips = 0, 0.0
        self.snapshots.forget()
        self.snapshots.statistics_at_snapshot = self.snapshots.trend_at_snapshot = None
        self.rollback_check.cut_short()
        return True

    def _unjudged(self, observation: Observation) -> Decision | None:
        """The decision for a step there is nothing to judge on (an fp16 overflow, an exactly zero gradient)."""
        state = self.state
        collapsed = self.detector.scale_collapsed(observation)
        overflow = observation.loss_scale is not None and observation.nonfinite and not observation.rank_local
        if overflow and not collapsed:
            state.count("amp_overflow")  # GradScaler skips this step and lowers the scale itself
            return Decision(state.steps, state.level, "amp_overflow", 0.0, math.inf, lr_scale=1.0)
        if not observation.nonfinite and not collapsed and observation.total_norm == 0.0:
            # no gradient, no information (a frozen phase, a loss term not switched on yet): nothing to judge or
            # learn; the loss of such a step does not train anything either
            state.count("zero_gradient")
            return Decision(state.steps, state.level, None, 0.0, math.inf, lr_scale=state.lr_scale)
        return None

    def _interventions(
        self,
        anomaly: str | None,
        previous_level: int,
        lr: float | None,
        diverged_loss: float | None = None,
        diverged_raw_loss: float | None = None,
    ) -> tuple[bool, bool, bool]:
        """``(skip, rollback, stop)`` for this step; applies the level's learning-rate back-off and, on a rollback,
        the snapshot's statistics (on a divergence, ``diverged_loss``: the smoothed loss with this step's, and
        ``diverged_raw_loss``: this step's loss as the trend learns it)."""
        state, config = self.state, self.config
        # only evidence of damage acts above clipping, and a loss spike only on its own batch
        laddered = anomaly in DAMAGE_EVIDENCE and anomaly not in SKIP_ONLY_EVIDENCE
        anomalous_level = state.level if laddered else 0
        divergence = anomaly == "divergence"
        horizon = config.healthy_steps_to_deescalate
        state.recent_skips *= 1.0 - 1.0 / horizon
        spike_skip = anomaly == "loss_spike" and config.allows("skip")
        if spike_skip and state.recent_skips >= MAX_SKIP_FRACTION * horizon:
            spike_skip = False  # too many for the statistic to be right: clip this one, learn it (see Detector.learn)
            state.count("skip_bound")
        skip = anomalous_level >= RUNGS.index("skip") or spike_skip or (divergence and config.allows("skip"))
        if spike_skip:
            state.recent_skips += 1.0
        if divergence:  # only to a snapshot whose own loss lies below the diverged one: else it cannot help
            rollback = state.has_snapshot and config.allows("rollback") and self.snapshots.below(diverged_loss)
        else:
            rollback = state.has_snapshot and anomalous_level == RUNGS.index("rollback")
        stop = anomalous_level == RUNGS.index("stop") or (divergence and state.lr_scale < MIN_LR_SCALE)
        new_episode = previous_level < state.level  # a back-off episode begins: the scale it began at was too high
        if anomalous_level == RUNGS.index("lr_backoff") and not divergence and self.backoff.step_down(lr, new_episode):
            stop = True
        if rollback:
            self.snapshots.restore_statistics()
        elif divergence and diverged_raw_loss is not None:
            # nothing to go back to: judge the next rise from the level this verdict was given on; the weights
            # are the same on the next step (this one is skipped), so its loss is the same evidence, not new
            self.detector.loss_trend.restart_at(diverged_raw_loss, self.detector.weight_norm)
        return skip, rollback, stop

    @property
    def loss_rules_active(self) -> bool:
        """Whether the loss rules (loss spikes, divergence) judge this run (see ``PolicyConfig.loss_rules``)."""
        return self.detector.loss_rules_active

    @property
    def loss_rules_off_reason(self) -> str | None:
        """Why ``loss_rules="auto"`` stopped judging the loss (``None`` while it judges, or when set by hand)."""
        return self.state.loss_rules_off

    def disable_loss_rules(self, reason: str) -> None:
        """Stop judging the loss under ``loss_rules="auto"``: it is not an objective that should fall.

        The adapter calls it for competing losses (several optimizers under manual optimization: a GAN); the
        policy itself on a negative loss. A no-op when ``loss_rules`` is ``True`` or ``False``.
        """
        self.detector.disable_loss_rules(reason)

    def lr_ceiling(self, lr: float | None = None) -> float:
        """The largest learning-rate multiplier the evidence supports for a scheduled learning rate ``lr``."""
        return self.backoff.ceiling(lr)

    def _record(self, decision: Decision, norm: float, previous_level: int, loss: float | None) -> None:
        self.log.record(decision, norm, previous_level, loss, self.rollback_check.last)
        self.state.events_recorded += 1

    def state_dict(self) -> dict[str, Any]:
        """Statistics, reference, loss trend, level, budgets used, LR scale, counts and events (versioned)."""
        return {
            "version": STATE_VERSION,
            **self.detector.statistics_state(),
            "loss_trend": self.detector.loss_trend.state_dict(),
            "statistics_at_snapshot": self.snapshots.statistics_at_snapshot,
            "trend_at_snapshot": self.snapshots.trend_at_snapshot,
            "growth": self.detector.growth.state_dict(),
            "counters": asdict(self.state),
            "events": self.events,
            "worst_spikes": [dict(e) for e in self.log.worst_spikes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where a ``state_dict`` left off; a malformed state (a key missing, a value of the
        wrong type or out of range) raises ``ValueError`` naming the key before anything is loaded. Version 3,
        written by 0.1, resumes too: what it lacks (the log-space loss statistics, the counters added since)
        starts afresh."""
        if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
            version = state.get("version") if isinstance(state, dict) else state
            raise ValueError(
                f"ExplosionPolicy state has version {version!r}; this code reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        template = ExplosionPolicy(self.config, self.max_events).state_dict()
        state = upgraded_policy_state(state, template)
        check_state(state, template, "ExplosionPolicy state", policy_rules(len(RUNGS)), POLICY_OPTIONAL)
        detector = self.detector
        detector.load_statistics(state)
        detector.loss_trend.load_state_dict(state["loss_trend"])
        self.snapshots.statistics_at_snapshot = state["statistics_at_snapshot"]
        self.snapshots.trend_at_snapshot = state["trend_at_snapshot"]
        detector.growth.load_state_dict(state["growth"])
        counters = state["counters"]
        # the parts share the counters: they are updated in place, not replaced
        self.state.assign(
            Counters(
                **{
                    **counters,
                    "counts": dict(counters["counts"]),
                    "first_anomaly_steps": dict(counters["first_anomaly_steps"]),
                }
            )
        )
        self.log.load(state["events"], state["worst_spikes"])
        # the state a rollback check kept aside is not in a checkpoint: a check cut short lets the rollback stand
        self.rollback_check.cut_short()

