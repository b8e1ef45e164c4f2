"""Explosion detection and the escalation ladder, as a pure state machine (no Lightning, no tensors).

:class:`ExplosionPolicy` turns one :class:`Observation` per optimizer step (numbers already reduced across
ranks, so every rank computes the same thing) into one :class:`Decision`. The ladder, lowest rung first:

==  ==============  =====================================================================================
0   ``observe``     detect and log only
1   ``clip``        adaptive clipping: a spike is clipped to ``exp(mu + z_thr^2 / z * sigma)`` in log space
                    (ZClip's reciprocal rule), so larger spikes are pulled closer to the running mean
2   ``tight_clip``  every step is clipped to ``tight_clip_ratio`` x the running typical norm
3   ``skip``        an anomalous step is skipped (the adapter drops its gradients)
4   ``lr_backoff``  additionally multiply the learning rate by ``backoff_factor``; it is restored gradually,
                    up to ``backoff_factor`` x the scale the episode began at (that scale proved too high)
5   ``rollback``    restore the last healthy snapshot of model and optimizer and skip the step
6   ``stop``        stop training (the adapter sets ``trainer.should_stop`` or raises)
==  ==============  =====================================================================================

Anomalies: a ``spike`` (log-norm z-score against a fast EMA), ``growth`` (a steep trend over a short
window), ``drift`` (the fast EMA has climbed more than ``growth_factor`` above a slow, long-horizon reference
that learns healthy steps only: slow sustained growth the fast statistics follow), ``nonfinite`` and
``loss_scale_collapse``. During drift the clip thresholds are capped by the reference, so they cannot ratchet
upward with the norm.

A rung handles ``budget`` anomalous steps, a rate drained by every healthy step (``budget /
healthy_steps_to_deescalate`` each), so the sparse clips of a healthy run never add up; past it the next
rung takes over. ``healthy_steps_to_deescalate`` consecutive healthy steps drop one level and empty the
budget. Lower rungs stay active above them (a skipping guard still clips tightly). A non-finite gradient
cannot be clipped, so it jumps straight to the ``skip`` rung. Under an fp16 ``GradScaler`` a non-finite
step is an overflow the scaler already skips: it is counted, never escalated; a loss scale below
``loss_scale_floor`` (the gradients overflow fp16 even unscaled) is an explosion.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_gradstab.running import GrowthWindow, LogNormStatistics

RUNGS: tuple[str, ...] = ("observe", "clip", "tight_clip", "skip", "lr_backoff", "rollback", "stop")
"""The ladder's rung names, lowest first; a rung's position is its level."""

DEFAULT_BUDGETS: dict[str, int] = {"clip": 8, "tight_clip": 4, "skip": 4, "lr_backoff": 6, "rollback": 3}
"""Anomalous steps each rung handles before the guard escalates (``observe`` and ``stop`` have none)."""

_RUNG_OPTIONS: dict[str, str] = {
    "tight_clip_ratio": "tight_clip",
    "backoff_factor": "lr_backoff",
    "lr_recovery_steps": "lr_backoff",
    "snapshot_every": "rollback",
}


def rung_level(name: object, argument: str) -> int:
    """The level of rung ``name``; ``ValueError`` naming ``argument`` if it is not a rung."""
    if name not in RUNGS:
        raise ValueError(f"`{argument}` must be one of {list(RUNGS)}, got {name!r}")
    return RUNGS.index(name)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PolicyConfig:
    """Every threshold and budget of the guard, validated on construction.

    Options that tune one rung default to ``None`` (use the default); setting one for a rung above
    ``max_rung`` is a contradiction and raises ``ValueError``.

    Args:
        max_rung: the highest rung the guard may reach (e.g. ``"clip"`` for clip-only).
        zscore_threshold: log-norm z-score above which a step is a spike, > 0 (ZClip: 2.5).
        ema_decay: weight of the past in the running log-norm statistics, in (0, 1).
        warmup_steps: finite steps before spikes are judged, >= 1.
        log_std_floor: smallest log-norm standard deviation used in z-scores, >= 0.
        growth_window: steps over which sustained growth is measured, >= 3.
        growth_factor: norm growth over ``growth_window``, or of the fast typical norm over the long-horizon
            reference, that counts as an explosion, > 1.
        drift_horizon_steps: horizon of the long-horizon reference (an exact mean over its first this many
            healthy steps, then an EMA with this horizon), greater than the fast EMA's ``1 / (1 - ema_decay)``;
            ``None`` turns drift detection off.
        healthy_steps_to_deescalate: consecutive healthy steps that drop the level by one, >= 1.
        loss_scale_floor: fp16 loss scale below which the scaler has collapsed, > 0.
        budgets: anomalous steps each rung may handle, e.g. ``{"skip": 2}`` (others keep their default).
        tight_clip_ratio: ``tight_clip`` threshold as a multiple of the typical norm, > 0 (default 1.0).
        backoff_factor: learning-rate multiplier per back-off, in (0, 1) (default 0.5).
        lr_recovery_steps: healthy steps to undo one back-off, >= 1 (default 100).
        snapshot_every: healthy steps between rollback snapshots, >= 1 (default 100: PaLM rolled back ~100 steps).

    Example::

        config = PolicyConfig(max_rung="skip", budgets={"clip": 4})
    """

    max_rung: str = "stop"
    zscore_threshold: float = 2.5
    ema_decay: float = 0.97
    warmup_steps: int = 25
    log_std_floor: float = 0.05
    growth_window: int = 20
    growth_factor: float = 10.0
    drift_horizon_steps: int | None = 1000
    healthy_steps_to_deescalate: int = 50
    loss_scale_floor: float = 1.0
    budgets: dict[str, int] | None = None
    tight_clip_ratio: float | None = None
    backoff_factor: float | None = None
    lr_recovery_steps: int | None = None
    snapshot_every: int | None = None

    def __post_init__(self) -> None:
        max_level = rung_level(self.max_rung, "max_rung")
        for name in ("zscore_threshold", "ema_decay", "log_std_floor", "growth_factor", "loss_scale_floor",
                     "tight_clip_ratio", "backoff_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"`{name}` must be a number, got {type(value).__name__} {value!r}")
        _check(self.zscore_threshold > 0, "zscore_threshold", self.zscore_threshold, "a number > 0")
        _check(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "a number in (0, 1)")
        _check_int(self.warmup_steps, "warmup_steps", 1)
        _check(self.log_std_floor >= 0, "log_std_floor", self.log_std_floor, "a number >= 0")
        _check_int(self.growth_window, "growth_window", 3)
        _check(self.growth_factor > 1, "growth_factor", self.growth_factor, "a number > 1")
        if self.drift_horizon_steps is not None:
            fast_horizon = 1.0 / (1.0 - self.ema_decay)
            _check_int(self.drift_horizon_steps, "drift_horizon_steps", 2)
            _check(
                self.drift_horizon_steps > fast_horizon,
                "drift_horizon_steps",
                self.drift_horizon_steps,
                f"None or an int above the fast EMA's horizon 1 / (1 - ema_decay) = {fast_horizon:.3g}",
            )
        _check_int(self.healthy_steps_to_deescalate, "healthy_steps_to_deescalate", 1)
        _check(self.loss_scale_floor > 0, "loss_scale_floor", self.loss_scale_floor, "a number > 0")
        for option, rung in _RUNG_OPTIONS.items():
            if getattr(self, option) is not None and RUNGS.index(rung) > max_level:
                raise ValueError(
                    f"`{option}` configures rung {rung!r}, which is above `max_rung`={self.max_rung!r}; "
                    f"raise `max_rung` to at least {rung!r} or drop `{option}`"
                )
        if self.tight_clip_ratio is not None:
            _check(self.tight_clip_ratio > 0, "tight_clip_ratio", self.tight_clip_ratio, "a number > 0")
        if self.backoff_factor is not None:
            _check(0 < self.backoff_factor < 1, "backoff_factor", self.backoff_factor, "a number in (0, 1)")
        if self.lr_recovery_steps is not None:
            _check_int(self.lr_recovery_steps, "lr_recovery_steps", 1)
        if self.snapshot_every is not None:
            _check_int(self.snapshot_every, "snapshot_every", 1)
        if self.budgets is not None:
            if not isinstance(self.budgets, dict):
                raise TypeError(f"`budgets` must be a dict of rung name -> int, got {type(self.budgets).__name__}")
            for rung, budget in self.budgets.items():
                if rung not in DEFAULT_BUDGETS:
                    raise ValueError(f"`budgets` key must be one of {list(DEFAULT_BUDGETS)}, got {rung!r}")
                if RUNGS.index(rung) > max_level:
                    raise ValueError(
                        f"`budgets` sets rung {rung!r}, which is above `max_rung`={self.max_rung!r}; "
                        f"raise `max_rung` to at least {rung!r} or drop that budget"
                    )
                _check_int(budget, f"budgets[{rung!r}]", 1)

    @property
    def max_level(self) -> int:
        """Level of ``max_rung``."""
        return RUNGS.index(self.max_rung)

    def budget(self, level: int) -> int:
        """Anomalous steps the rung at ``level`` handles before escalating."""
        rung = RUNGS[level]
        return (self.budgets or {}).get(rung, DEFAULT_BUDGETS.get(rung, 0))

    def resolved(self, option: str) -> Any:
        """The value of a per-rung option, its default when unset."""
        defaults = {"tight_clip_ratio": 1.0, "backoff_factor": 0.5, "lr_recovery_steps": 100, "snapshot_every": 100}
        value = getattr(self, option)
        return defaults[option] if value is None else value


@dataclass(frozen=True)
class Observation:
    """What the guard knows about one optimizer step, already reduced across ranks.

    Attributes:
        total_norm: L2 norm of all gradients (any value when ``nonfinite``).
        nonfinite: some gradient on some rank holds a NaN or Inf.
        loss_scale: the fp16 ``GradScaler`` scale used for this step, ``None`` without a scaler.
    """

    total_norm: float
    nonfinite: bool = False
    loss_scale: float | None = None


@dataclass(frozen=True)
class Decision:
    """What to do with the current step; the adapter carries it out identically on every rank.

    Attributes:
        step: optimizer steps seen by the policy, 1-based.
        level: ladder level after this step's escalation or de-escalation.
        anomaly: ``"spike"``, ``"growth"``, ``"drift"``, ``"nonfinite"``, ``"loss_scale_collapse"``, ``"amp_overflow"``
            or ``None`` for a healthy step.
        zscore: log-norm z-score of the raw norm (0 in warm-up or when non-finite).
        clip_threshold: the norm the step is clipped to (``inf`` when no clipping is armed).
        clip_coefficient: multiply every gradient by this (1.0: leave them alone).
        skip: drop this step's gradients so neither weights nor optimizer state change.
        lr_scale: learning-rate multiplier to apply around this step.
        rollback: restore the last healthy snapshot before skipping this step.
        stop: stop the run.
        snapshot: this step is healthy; take a rollback snapshot of the state *before* it.
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

    @property
    def rung(self) -> str:
        """Name of the level."""
        return RUNGS[self.level]

    @property
    def actions(self) -> list[str]:
        """The interventions this decision makes, e.g. ``["clip"]`` or ``["rollback", "skip"]``."""
        names = []
        if self.clip_coefficient < 1.0 and not self.skip:
            names.append("clip")
        for name in ("rollback", "stop", "skip"):
            if getattr(self, name):
                names.append(name)
        return names


@dataclass
class _Counters:
    steps: int = 0
    level: int = 0
    anomalies_at_level: float = 0.0  # a leaky bucket: each healthy step drains budget / healthy_steps_to_deescalate
    healthy_streak: int = 0
    steps_since_snapshot: int = 0
    has_snapshot: bool = False
    lr_scale: float = 1.0
    lr_ceiling: float = 1.0
    events_recorded: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class ExplosionPolicy:
    """The guard's brain: detection, escalation ladder, budgets, de-escalation, event log.

    Args:
        config: thresholds and budgets (see :class:`PolicyConfig`).
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
        self.statistics = LogNormStatistics(self.config.ema_decay, self.config.warmup_steps, self.config.log_std_floor)
        self.growth = GrowthWindow(self.config.growth_window)
        horizon = self.config.drift_horizon_steps
        # the healthy level the fast statistics are compared with; exact mean first, so it starts from the whole
        # early run (warm-up growth included) rather than from the init regime's first norms
        self.reference = None if horizon is None else LogNormStatistics(1.0 - 1.0 / horizon, horizon, 0.0)
        self._statistics_at_snapshot: dict[str, Any] | None = None
        self.state = _Counters(level=self.base_level)
        self.events: list[dict[str, Any]] = []
        self.worst_spikes: list[dict[str, Any]] = []

    @property
    def level(self) -> int:
        """Current ladder level."""
        return self.state.level

    def events_since(self, recorded: int) -> list[dict[str, Any]]:
        """Events recorded after the first ``recorded`` ones (those still kept), for incremental writers."""
        missing = self.state.events_recorded - recorded
        return self.events[len(self.events) - min(missing, len(self.events)) :] if missing > 0 else []

    @property
    def counts(self) -> dict[str, int]:
        """How often each action and anomaly happened (``clip``, ``skip``, ``amp_overflow``, ...)."""
        return dict(self.state.counts)

    def step(self, observation: Observation) -> Decision:
        """Judge one optimizer step and decide what to do with it."""
        state, config = self.state, self.config
        state.steps += 1
        if observation.loss_scale is not None and observation.nonfinite:
            self._count("amp_overflow")  # GradScaler skips this step and lowers the scale itself
            return Decision(state.steps, state.level, "amp_overflow", 0.0, math.inf, lr_scale=1.0)

        norm = observation.total_norm
        zscore = 0.0 if observation.nonfinite else self.statistics.zscore(norm)
        anomaly: str | None = None
        drifting = not observation.nonfinite and self.drift() > math.log(config.growth_factor)
        if observation.loss_scale is not None and observation.loss_scale < config.loss_scale_floor:
            anomaly = "loss_scale_collapse"
        elif observation.nonfinite:
            anomaly = "nonfinite"
        else:
            self.growth.push(norm)
            if zscore > config.zscore_threshold:
                anomaly = "spike"
            elif self.growth.growth_factor() > config.growth_factor:
                anomaly = "growth"
            elif drifting:
                anomaly = "drift"

        previous_level = state.level
        if anomaly is None:
            self._on_healthy_step()
        else:
            self._escalate(anomaly)

        adaptive_threshold = self._adaptive_threshold(zscore)
        threshold = adaptive_threshold
        if drifting and state.level >= RUNGS.index("clip"):  # the edge of the band drift is judged by
            threshold = min(threshold, config.growth_factor * self.reference_norm)
        if state.level >= RUNGS.index("tight_clip") and self.statistics.warmed_up:
            typical = min(self.statistics.typical_norm, self.reference_norm)
            threshold = min(threshold, config.resolved("tight_clip_ratio") * typical)
        coefficient = 1.0
        if not observation.nonfinite and math.isfinite(threshold) and norm > threshold:
            coefficient = threshold / norm
        anomalous_level = state.level if anomaly is not None else 0
        skip = anomalous_level >= RUNGS.index("skip")
        rollback = anomalous_level == RUNGS.index("rollback") and state.has_snapshot
        stop = anomalous_level == RUNGS.index("stop")
        if anomalous_level == RUNGS.index("lr_backoff"):
            if previous_level < state.level:  # a new back-off episode: the scale it began at was too high
                state.lr_ceiling = min(state.lr_ceiling, state.lr_scale * config.resolved("backoff_factor"))
            state.lr_scale *= config.resolved("backoff_factor")
        if rollback:
            self._restore_statistics()
        snapshot = (
            anomaly is None
            and config.max_level >= RUNGS.index("rollback")
            and state.level <= self.base_level
            and (not state.has_snapshot or state.steps_since_snapshot >= config.resolved("snapshot_every"))
        )
        if not observation.nonfinite and not rollback:  # learn the spike-clipped norm, not the tight clip's
            self.statistics.update(min(norm, adaptive_threshold))
            if anomaly is None and state.level <= self.base_level and self.reference is not None:
                self.reference.update(norm)  # healthy steps at rest only: an episode's norms are not the baseline
        if snapshot:
            state.has_snapshot, state.steps_since_snapshot = True, 0
            self._statistics_at_snapshot = None
        elif anomaly is None:
            state.steps_since_snapshot += 1
        if (  # what a rollback restores: the first statistics since the snapshot that can judge a step
            self._statistics_at_snapshot is None
            and state.has_snapshot
            and anomaly is None
            and state.level <= self.base_level
            and self.statistics.warmed_up
        ):
            self._statistics_at_snapshot = self._statistics_state()

        decision = Decision(
            step=state.steps,
            level=state.level,
            anomaly=anomaly,
            zscore=zscore,
            clip_threshold=threshold,
            clip_coefficient=1.0 if skip else coefficient,
            skip=skip,
            lr_scale=1.0 if skip else state.lr_scale,
            rollback=rollback,
            stop=stop,
            snapshot=snapshot,
        )
        for action in decision.actions:
            self._count(action)
        if anomaly is not None:
            self._count(anomaly)
        if anomaly is not None or decision.skip or state.level != previous_level:
            self._record(decision, norm, previous_level)
        return decision

    @property
    def reference_norm(self) -> float:
        """The long-horizon healthy norm, ``exp`` of the reference's mean log-norm (``inf`` without one yet)."""
        if self.reference is None or not self.reference.count:
            return math.inf
        return self.reference.typical_norm

    def drift(self) -> float:
        """Log of how far the fast typical norm lies above the long-horizon reference (0 until both exist)."""
        if self.reference is None or not self.statistics.warmed_up or not self.reference.count:
            return 0.0
        return self.statistics.mean - self.reference.mean

    def _statistics_state(self) -> dict[str, Any]:
        reference = None if self.reference is None else self.reference.state_dict()
        return {"statistics": self.statistics.state_dict(), "reference": reference}

    def _restore_statistics(self) -> None:
        # after a rollback the weights are the snapshot's again: so are the statistics that describe them
        self.growth.clear()
        if self._statistics_at_snapshot is not None:
            self.statistics.load_state_dict(self._statistics_at_snapshot["statistics"])
            if self.reference is not None and self._statistics_at_snapshot["reference"] is not None:
                self.reference.load_state_dict(self._statistics_at_snapshot["reference"])

    def _on_healthy_step(self) -> None:
        state, config = self.state, self.config
        state.healthy_streak += 1
        # a budget is a rate, not a lifetime count: anomalies as sparse as the healthy band's (ZClip clips ~1 % of
        # steps) drain away and never escalate; a burst of more than `budget` within about
        # `healthy_steps_to_deescalate` steps does
        drain = config.budget(state.level) / config.healthy_steps_to_deescalate
        state.anomalies_at_level = max(0.0, state.anomalies_at_level - drain)
        if state.lr_scale < state.lr_ceiling:  # undo one back-off factor per lr_recovery_steps healthy steps
            recovery = (1.0 / config.resolved("backoff_factor")) ** (1.0 / config.resolved("lr_recovery_steps"))
            state.lr_scale = min(state.lr_ceiling, state.lr_scale * recovery)
        if state.healthy_streak >= config.healthy_steps_to_deescalate:
            state.healthy_streak = 0
            state.anomalies_at_level = 0
            if state.level > self.base_level:
                state.level -= 1
                self._count("deescalate")

    def _escalate(self, anomaly: str) -> None:
        state, config = self.state, self.config
        state.healthy_streak = 0
        skip_level = RUNGS.index("skip")
        if anomaly in ("nonfinite", "loss_scale_collapse") and state.level < skip_level <= config.max_level:
            state.level, state.anomalies_at_level = skip_level, 0  # clipping cannot repair these
            self._count("escalate")
        state.anomalies_at_level += 1
        if state.anomalies_at_level > config.budget(state.level) and state.level < config.max_level:
            state.level += 1
            state.anomalies_at_level = 1
            self._count("escalate")

    def _adaptive_threshold(self, zscore: float) -> float:
        if self.state.level < RUNGS.index("clip") or not self.statistics.warmed_up:
            return math.inf
        z_threshold = self.config.zscore_threshold
        # ZClip's reciprocal rule: a spike at z is clipped to z_thr^2 / z, closer to the mean the larger it is
        return self.statistics.norm_at(z_threshold * min(1.0, z_threshold / zscore) if zscore > 0 else z_threshold)

    def _count(self, name: str) -> None:
        self.state.counts[name] = self.state.counts.get(name, 0) + 1

    def _record(self, decision: Decision, norm: float, previous_level: int) -> None:
        event = {
            "step": decision.step,
            "total_norm": norm if math.isfinite(norm) and decision.anomaly != "nonfinite" else None,
            "zscore": round(decision.zscore, 4),
            "clip_threshold": decision.clip_threshold if math.isfinite(decision.clip_threshold) else None,
            "level": decision.level,
            "previous_level": previous_level,
            "rung": decision.rung,
            "anomaly": decision.anomaly,
            "actions": decision.actions,
            "lr_scale": decision.lr_scale,
        }
        self.events.append(event)
        self.state.events_recorded += 1
        del self.events[: -self.max_events]
        if decision.anomaly in ("spike", "growth", "drift", "nonfinite", "loss_scale_collapse"):
            self.worst_spikes.append(event)
            self.worst_spikes.sort(key=_severity, reverse=True)
            del self.worst_spikes[5:]

    def state_dict(self) -> dict[str, Any]:
        """Statistics, reference, level, budgets used, learning-rate scale, counts and the event log (versioned)."""
        return {
            "version": 2,
            **self._statistics_state(),
            "statistics_at_snapshot": self._statistics_at_snapshot,
            "growth": self.growth.state_dict(),
            "counters": asdict(self.state),
            "events": [dict(e) for e in self.events],
            "worst_spikes": [dict(e) for e in self.worst_spikes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where a ``state_dict`` left off."""
        if state.get("version") != 2:
            raise ValueError(f"ExplosionPolicy state has version {state.get('version')!r}; this code reads 2")
        self.statistics.load_state_dict(state["statistics"])
        if self.reference is not None and state["reference"] is not None:
            self.reference.load_state_dict(state["reference"])
        self._statistics_at_snapshot = state["statistics_at_snapshot"]
        self.growth.load_state_dict(state["growth"])
        self.state = _Counters(**{**state["counters"], "counts": dict(state["counters"]["counts"])})
        self.events = [dict(e) for e in state["events"]]
        self.worst_spikes = [dict(e) for e in state["worst_spikes"]]


def _severity(event: dict[str, Any]) -> float:
    return math.inf if event["total_norm"] is None else event["zscore"]


def _check(ok: bool, argument: str, value: object, accepted: str) -> None:
    if not ok:
        raise ValueError(f"`{argument}` must be {accepted}, got {value!r}")


def _check_int(value: object, argument: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"`{argument}` must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    _check(value >= minimum, argument, value, f"an int >= {minimum}")
