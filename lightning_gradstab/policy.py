"""Explosion detection and the escalation ladder, as a pure state machine (no Lightning, no tensors).

:class:`ExplosionPolicy` turns one :class:`Observation` per optimizer step (numbers already reduced across
ranks, so every rank computes the same thing) into one :class:`Decision`. The ladder, lowest rung first:

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

Evidence, by what it is about:

- gradient: a ``spike`` (log-norm z-score against a fast EMA; during the warm-up, a norm more than
  ``growth_factor`` above the warm-up's own geometric mean), ``growth`` (a steep trend over a short window),
  ``drift`` (the fast EMA has climbed more than ``growth_factor`` above a slow, long-horizon reference that
  learns healthy steps only), ``nonfinite``;
- loss: a ``loss_spike`` (z-score of the step's loss against its running statistics above
  ``loss_zscore_threshold``, OLMo's 6 sigma) and ``divergence`` (the smoothed loss has risen more than
  ``loss_rise_tolerance`` of its lowest value, and more than 3 standard deviations of the loss, above it: the
  step size is too large). Divergence rolls back to the last snapshot taken while the loss was not rising and
  backs the learning rate off at once, whatever the rung;
- update: ``update_ratio`` (plain SGD only: ``lr / (1 - momentum) * |g| / |w|`` above ``max_update_ratio``, a
  step that would move the weights by more than their own norm); the gradient is clipped to the bound;
  skipping a step that is safe once clipped would only repeat it, so it escalates to ``tight_clip`` at most;
- loss scale: ``loss_scale_collapse`` (an fp16 ``GradScaler`` scale below ``loss_scale_floor``, judged on
  overflow steps too): the scale is reset to the scaler's initial value and the step skipped; a collapse that
  keeps coming back climbs the ladder to ``stop``.

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

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lightning_gradstab.arguments import check_int, require
from lightning_gradstab.running import GrowthWindow, LogNormStatistics, LossTrend, RunningMoments

RUNGS: tuple[str, ...] = ("observe", "clip", "tight_clip", "skip", "lr_backoff", "rollback", "stop")
"""The ladder's rung names, lowest first; a rung's position is its level."""

DEFAULT_BUDGETS: dict[str, int] = {"clip": 8, "tight_clip": 4, "skip": 4, "lr_backoff": 6, "rollback": 3}
"""Anomalous steps each rung handles before the guard escalates (``observe`` and ``stop`` have none)."""

EVIDENCE: dict[str, str] = {
    "spike": "gradient",
    "growth": "gradient",
    "drift": "gradient",
    "nonfinite": "gradient",
    "update_ratio": "update",
    "loss_spike": "loss",
    "divergence": "loss",
    "loss_scale_collapse": "loss scale",
    "amp_overflow": "loss scale",
}
"""What each anomaly is evidence from: the gradient, the loss, the size of the update or the fp16 loss scale."""

DAMAGE_EVIDENCE: frozenset[str] = frozenset({"nonfinite", "loss_spike", "divergence", "loss_scale_collapse"})
"""Anomalies that show the step would damage training, the only ones that may skip, back off, roll back or stop.

A gradient statistic (a spike, growth, drift, an oversized SGD step) says a step is *unusual*, not that it is
harmful: when the scale of the gradient changes for good (a model leaving a plateau, a layer unfrozen, a task whose
norm grows while its loss falls) every step looks unusual. Clipping costs little and is reversible by the next
step, so gradient evidence may clip (up to ``tight_clip``); the costly rungs need a non-finite value, a batch whose
own loss lies far outside the running loss, a sustained rise of the smoothed loss, or a collapsed fp16 scale."""

SKIP_ONLY_EVIDENCE: frozenset[str] = frozenset({"loss_spike"})
"""Damage evidence whose remedy is skipping its batch and nothing more: a bad batch says nothing about the learning
rate, so repeated bad batches never back the learning rate off or roll back (each one is skipped on its own)."""

MAX_SKIP_FRACTION = 0.1
"""Largest fraction of recent steps (a ``healthy_steps_to_deescalate`` horizon) that loss spikes may skip.

A 6-sigma threshold on a well-estimated spread fires on a tiny fraction of batches; skipping more than one in ten
says the statistic is wrong for this loss (a heavy tail, a new regime), not that a tenth of the data is bad. Past
the bound a loss spike is clipped instead of skipped and the loss statistics learn it, so a run cannot be starved."""

REGIME_STEPS = 10
"""Consecutive gradient anomalies, with the loss not rising, after which the gradient statistics re-learn.

Statistics that learn only clipped norms never accept a new, legitimate scale; once the norm has been unusual for
this many steps in a row while the loss kept improving, the statistics move to the level of those steps (spikes,
growth and drift only: an oversized SGD step is measured against the weights, not against the norm's history).

What moves is the location, the mean of ``log(norm)``; the spread already learned is kept. A change of scale is a
shift in log space and leaves the log-norm spread as it was, while the steps that reveal the new scale are a climb:
their own spread measures the climb, not the noise (on a VGG without normalization a re-seed from them widened the
clip threshold 25-fold, and the next, 8x step killed the ReLUs). Re-seeding also meant a new warm-up, during which
only ``growth_factor`` x the typical norm is clipped."""

MIN_LR_SCALE = 2.0**-10
"""The floor of the learning-rate multiplier (about 1/1000 of the configured LR): a back-off that would go below it
stops the run with its reason instead, so the guard never freezes a run silently."""

LOSS_NOISE_SIGMAS = 3.0
"""A divergence must also lie this many per-step loss standard deviations above the lowest smoothed loss.

The smoothed loss (a ``loss_horizon_steps``-step EMA) of independent noise of standard deviation ``s`` has a
standard deviation of ``s / sqrt(2 h - 1)`` (0.23 ``s`` at ``h = 10``): 3 ``s`` is 13 of those, never noise."""

PROGRESS_SHARE = 0.01
"""A divergence must also give back this share of the progress the run has made (its first loss minus the lowest
smoothed loss), or more.

The other two margins scale with the lowest loss and with its noise, and both vanish as a run approaches an exact
fit: a regressor trained to interpolation (a loss of 1e-15, full batch, no noise) reads Adam's own excursions to
1e-6..1e-4, which it recovers from by itself, as divergences, and each one backs the learning rate off for good
(x 0.002 over 6000 steps). Measured on the run's own scale, its first loss, such a rise gives back a hundredth of
a percent of what the run gained: no damage a rollback or a back-off would repair at their cost. A divergence of
an unstable run gives back a large share (the loss climbs toward, or past, where it began); 1 % is the same
resolution as the loss spread's floor (:data:`RELATIVE_LOSS_STD_FLOOR`)."""

LOSS_HORIZON_STEPS = 10
"""Effective window of the smoothed loss that divergence is judged on."""

RELATIVE_LOSS_STD_FLOOR = 0.01
"""Smallest loss standard deviation used in loss z-scores, as a fraction of the mean loss."""

SCALE_INVARIANT_MAX_NORM = 1.0
"""The gradient-norm ceiling ``max_norm="auto"`` applies to optimizers whose step ignores the gradient's scale.

Adam and its relatives divide by a running root mean square of the gradient, so multiplying every gradient by a
constant leaves their steps unchanged: a ceiling cannot shrink their step size the way it does SGD's (where a
ceiling of 1 on a model whose healthy norm is 100 is a 100x lower learning rate). What it changes is how much one
step weighs against the others: a gradient ``k`` times the typical one enters Adam's first moment with weight
``(1 - beta1) k`` while barely moving the slow second moment, so its push grows with ``k``. Capping the norm
keeps an early or heavy-tailed step from dominating the moments (Zhang et al. 2020, "Why are adaptive methods
good for attention models?": heavy-tailed gradient noise, which clipping tames). 1.0 is the ceiling of nearly
every published AdamW recipe (GPT-3, LLaMA, OLMo, Wortsman et al. 2023's small-scale proxies) and ZClip's
``max_grad_norm`` default; on a model whose healthy norms are all above it, every step is normalised, which for
a scale-invariant optimizer is a change of weighting, not of step size."""

SNAPSHOT_HEALTHY_STREAK = 10
"""Consecutive healthy steps before a refreshed snapshot is taken: a state the guard is acting on is not one."""

ROLLBACK_CHECK_STEPS = 4
"""Batches the snapshot's weights are scored on after a divergence's rollback, before the rollback is trusted.

A divergence says the smoothed loss rose; it cannot say whether the weights got worse or the objective got harder
(a curriculum's next stage, a loss term whose weight is scheduled up, a policy whose returns changed). The snapshot
answers it, on new batches: if the weights were the damage, the snapshot's weights score what they scored when
it was taken (``l_s``); if the objective moved, every weights' loss rose with it, the snapshot's by about as much
as the diverged weights' rose above their lowest smoothed loss (the rise ``r`` that made the verdict), or more.
The guard rolls back, skips the next ``ROLLBACK_CHECK_STEPS`` steps while their losses score the snapshot, and
keeps the rollback unless the mean lies above the midpoint ``l_s + r / 2`` (the likelihood-ratio test between two
equal-variance means). The divergence margin is at least :data:`LOSS_NOISE_SIGMAS` (3) per-step loss standard
deviations ``s``, so the midpoint lies >= 1.5 ``s`` from either mean; the mean of 4 batches has a standard
deviation of ``s / 2``: the midpoint is >= 3 standard errors from either hypothesis, a wrong verdict about once
in 700 checks. An objective that moved undoes the rollback (the weights of the divergence step come back), the
back-off and the level, and the loss is judged from its new level.

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
    return RUNGS.index(name)


@dataclass(frozen=True)
class PolicyConfig:
    """Every threshold and budget of the guard, validated on construction.

    Options that tune one rung default to ``None`` (use the default); setting one for a rung above
    ``max_rung`` is a contradiction and raises ``ValueError``. Every number must be finite (``inf`` and
    ``nan`` are rejected naming the argument): a threshold of ``inf`` silently turns a rule off or on.

    Args:
        max_rung: the highest rung the guard may reach (e.g. ``"clip"`` for clip-only).
        zscore_threshold: log-norm z-score above which a step is a spike, > 0 (ZClip: 2.5).
        ema_decay: weight of the past in the running log-norm and loss statistics, in (0, 1).
        warmup_steps: finite steps before spikes are judged by z-score, >= 1; during them a norm more than
            ``growth_factor`` above the geometric mean of the steps so far is clipped to that bound.
        log_std_floor: smallest log-norm standard deviation used in z-scores, >= 0.
        growth_window: steps over which sustained growth is measured, >= 3.
        growth_factor: norm growth over ``growth_window``, of the fast typical norm over the long-horizon
            reference, or of a warm-up step over the warm-up so far, that counts as an explosion, > 1.
        drift_horizon_steps: horizon of the long-horizon reference (an exact mean over its first this many
            healthy steps, then an EMA with this horizon), greater than the fast EMA's ``1 / (1 - ema_decay)``;
            ``None`` turns drift detection off.
        healthy_steps_to_deescalate: consecutive healthy steps that drop the level by one, >= 1.
        loss_scale_floor: fp16 loss scale below which the scaler has collapsed, > 0.
        loss_zscore_threshold: loss z-score above which the step's batch is skipped, > 0 (OLMo: 6); ``None``
            turns loss spikes off.
        loss_rise_tolerance: rise of the smoothed loss above its lowest value, as a fraction of that value,
            that makes a divergence, > 0; ``None`` turns divergence detection off.
        loss_rules: whether the loss rules (loss spikes, divergence) judge this run: ``True``, ``False`` or
            ``"auto"`` (the default: on, until the loss shows it is not an objective that should fall: a
            negative loss, or the adapter reports competing losses such as a GAN's). Adversarial,
            policy-gradient and scheduled-term losses rise in healthy training; pass ``False`` for those the
            adapter cannot recognise.
        max_update_ratio: largest ``lr * |g| / |w|`` of a plain SGD step (momentum included as
            ``lr / (1 - momentum)``), > 0; the gradient is clipped to it. ``None`` turns it off.
        max_norm: an absolute ceiling on the gradient norm, > 0; ``"auto"`` (the default):
            :data:`SCALE_INVARIANT_MAX_NORM` for an optimizer whose step ignores the gradient's scale (the
            observation says so, see :attr:`Observation.scale_invariant`), none for the others; ``None``: none.
        budgets: anomalous steps each rung may handle, e.g. ``{"skip": 2}`` (others keep their default).
        tight_clip_ratio: ``tight_clip`` threshold as a multiple of the typical norm, > 0 (default 1.0).
        backoff_factor: learning-rate multiplier per back-off, in (0, 1) (default 0.5).
        lr_recovery_steps: healthy steps to undo one back-off, >= 1 (default 25).
        snapshot_every: healthy steps between rollback snapshots, >= 1 (default 100: PaLM rolled back ~100 steps);
            earlier in a run, a snapshot is refreshed once half the steps so far have passed since it.

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
    loss_zscore_threshold: float | None = 6.0
    loss_rise_tolerance: float | None = 0.5
    max_update_ratio: float | None = 1.0
    max_norm: float | Literal["auto"] | None = "auto"
    loss_rules: bool | Literal["auto"] = "auto"
    budgets: dict[str, int] | None = None
    tight_clip_ratio: float | None = None
    backoff_factor: float | None = None
    lr_recovery_steps: int | None = None
    snapshot_every: int | None = None

    def __post_init__(self) -> None:
        max_level = rung_level(self.max_rung, "max_rung")
        for name in ("zscore_threshold", "ema_decay", "log_std_floor", "growth_factor", "loss_scale_floor",
                     "loss_zscore_threshold", "loss_rise_tolerance", "max_update_ratio", "max_norm",
                     "tight_clip_ratio", "backoff_factor"):
            value = getattr(self, name)
            if value is None or (name == "max_norm" and value == "auto"):
                continue
            if name == "max_norm" and isinstance(value, str):
                raise ValueError(f"`max_norm` must be a number > 0, 'auto' or None, got {value!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"`{name}` must be a number, got {type(value).__name__} {value!r}")
            require(math.isfinite(value), name, value, "a finite number (inf and nan are not thresholds)")
        if self.loss_rules not in (True, False, "auto"):
            raise ValueError(f"`loss_rules` must be True, False or 'auto', got {self.loss_rules!r}")
        require(self.zscore_threshold > 0, "zscore_threshold", self.zscore_threshold, "a number > 0")
        require(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "a number in (0, 1)")
        check_int(self.warmup_steps, "warmup_steps", 1)
        require(self.log_std_floor >= 0, "log_std_floor", self.log_std_floor, "a number >= 0")
        check_int(self.growth_window, "growth_window", 3)
        require(self.growth_factor > 1, "growth_factor", self.growth_factor, "a number > 1")
        if self.drift_horizon_steps is not None:
            fast_horizon = 1.0 / (1.0 - self.ema_decay)
            check_int(self.drift_horizon_steps, "drift_horizon_steps", 2)
            require(
                self.drift_horizon_steps > fast_horizon,
                "drift_horizon_steps",
                self.drift_horizon_steps,
                f"None or an int above the fast EMA's horizon 1 / (1 - ema_decay) = {fast_horizon:.3g}",
            )
        check_int(self.healthy_steps_to_deescalate, "healthy_steps_to_deescalate", 1)
        require(self.loss_scale_floor > 0, "loss_scale_floor", self.loss_scale_floor, "a number > 0")
        for name in ("loss_zscore_threshold", "loss_rise_tolerance", "max_update_ratio", "max_norm"):
            value = getattr(self, name)
            if value is not None and value != "auto":
                require(value > 0, name, value, "None or a number > 0")
        for option, rung in _RUNG_OPTIONS.items():
            if getattr(self, option) is not None and RUNGS.index(rung) > max_level:
                raise ValueError(
                    f"`{option}` configures rung {rung!r}, which is above `max_rung`={self.max_rung!r}; "
                    f"raise `max_rung` to at least {rung!r} or drop `{option}`"
                )
        if self.tight_clip_ratio is not None:
            require(self.tight_clip_ratio > 0, "tight_clip_ratio", self.tight_clip_ratio, "a number > 0")
        if self.backoff_factor is not None:
            require(0 < self.backoff_factor < 1, "backoff_factor", self.backoff_factor, "a number in (0, 1)")
        if self.lr_recovery_steps is not None:
            check_int(self.lr_recovery_steps, "lr_recovery_steps", 1)
        if self.snapshot_every is not None:
            check_int(self.snapshot_every, "snapshot_every", 1)
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
                check_int(budget, f"budgets[{rung!r}]", 1)

    @property
    def max_level(self) -> int:
        """Level of ``max_rung``."""
        return RUNGS.index(self.max_rung)

    def allows(self, rung: str) -> bool:
        """Whether ``max_rung`` lets the guard act on ``rung``."""
        return self.max_level >= RUNGS.index(rung)

    def budget(self, level: int) -> int:
        """Anomalous steps the rung at ``level`` handles before escalating."""
        rung = RUNGS[level]
        return (self.budgets or {}).get(rung, DEFAULT_BUDGETS.get(rung, 0))

    def resolved(self, option: str) -> Any:
        """The value of a per-rung option, its default when unset."""
        defaults = {"tight_clip_ratio": 1.0, "backoff_factor": 0.5, "lr_recovery_steps": 25, "snapshot_every": 100}
        value = getattr(self, option)
        return defaults[option] if value is None else value


@dataclass(frozen=True)
class Observation:
    """What the guard knows about one optimizer step, already reduced across ranks.

    Attributes:
        total_norm: L2 norm of all gradients (any value when ``nonfinite``).
        nonfinite: some gradient on some rank holds a NaN or Inf.
        loss_scale: the fp16 ``GradScaler`` scale used for this step, ``None`` without a scaler.
        rank_local: the non-finite values are on some ranks but not on all of them (a rank-local fault,
            never an fp16 overflow: under DDP an overflow reaches every rank through the all-reduce).
        loss: the step's training loss (unscaled, summed over micro-batches; the maximum over ranks),
            ``None`` when the step had none (e.g. the second optimizer of a manual step).
        weight_norm: L2 norm of the weights this optimizer updates, ``None`` when not measured.
        step_size: the plain-SGD step size per unit gradient, ``lr / (1 - momentum)`` before the guard's own
            learning-rate scale; ``None`` for optimizers whose step does not scale with the gradient (Adam).
        lr: the scheduled learning rate (first param group) before the guard's scale, ``None`` if unknown. With
            it, the ceiling a back-off leaves is an absolute learning rate, so a schedule that decays below the
            rate that failed runs at its own rate again.
        scale_invariant: the optimizer's step does not change when every gradient is multiplied by a constant
            (Adam, AdamW, RMSprop, Adagrad, ...): ``max_norm="auto"`` gives it a ceiling.
    """

    total_norm: float
    nonfinite: bool = False
    loss_scale: float | None = None
    rank_local: bool = False
    loss: float | None = None
    weight_norm: float | None = None
    step_size: float | None = None
    lr: float | None = None
    scale_invariant: bool = False


@dataclass(frozen=True)
class Decision:
    """What to do with the current step; the adapter carries it out identically on every rank.

    Attributes:
        step: optimizer steps seen by the policy, 1-based.
        level: ladder level after this step's escalation or de-escalation.
        anomaly: a key of :data:`EVIDENCE` (``"spike"``, ``"loss_spike"``, ``"divergence"``, ...) or ``None``
            for a healthy step.
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
        rollback_check: the rollback check (:data:`ROLLBACK_CHECK_STEPS`): ``"start"`` (keep the current state
            aside, then roll back), ``"score"`` (a skipped step whose loss scores the snapshot), ``"undo"`` (the
            objective moved: put the state kept aside back) or ``"keep"`` (the rollback stands: drop it);
            ``None`` outside a check.
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


@dataclass
class _Counters:
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
    counts: dict[str, int] = field(default_factory=dict)
    first_anomaly_steps: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Judgement:
    """What :meth:`ExplosionPolicy._judge` found in one step's evidence (the inputs of everything after it)."""

    norm: float
    nonfinite: bool
    collapsed: bool
    loss: float | None
    learned_loss: float | None
    zscore: float
    loss_zscore: float
    warmup_threshold: float
    update_threshold: float
    drifting: bool
    benign: bool  # the loss is not rising (or is not judged): a gradient anomaly has done no visible harm
    anomaly: str | None


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
        # the per-step loss noise (linear: the divergence margin is a distance in loss units) ...
        self.loss_statistics = RunningMoments(
            self.config.ema_decay, self.config.warmup_steps, relative_std_floor=RELATIVE_LOSS_STD_FLOOR
        )
        # ... and the loss in log space, where spikes are judged: a positive loss fluctuates multiplicatively
        # (a batch twice as hard is twice the loss at any level), so near convergence, where the linear spread
        # is tiny, an ordinary hard batch is not a many-sigma event
        self.log_loss_statistics = LogNormStatistics(
            self.config.ema_decay, self.config.warmup_steps, RELATIVE_LOSS_STD_FLOOR
        )
        self.loss_trend = LossTrend(LOSS_HORIZON_STEPS)
        self.growth = GrowthWindow(self.config.growth_window)
        horizon = self.config.drift_horizon_steps
        # the healthy level the fast statistics are compared with; exact mean first, so it starts from the whole
        # early run (warm-up growth included) rather than from the init regime's first norms
        self.reference = None if horizon is None else LogNormStatistics(1.0 - 1.0 / horizon, horizon, 0.0)
        self._statistics_at_snapshot: dict[str, Any] | None = None
        self._trend_at_snapshot: dict[str, Any] | None = None
        self._before_divergence: dict[str, Any] | None = None  # what an undone rollback check puts back
        self._check_level = self.base_level
        self.last_rollback_check: dict[str, Any] | None = None
        """The last rollback check's numbers: ``snapshot_loss``, ``diverged_loss``, ``scored_loss``,
        ``scored_spread`` (their sample standard deviation), ``batches`` and ``verdict`` (``"weights"``: the
        rollback stood; ``"objective"``: the objective moved, and it was undone)."""
        self.state = _Counters(level=self.base_level)
        self._events: list[dict[str, Any]] = []
        self.worst_spikes: list[dict[str, Any]] = []

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
        """The kept event log, oldest first (copies: editing them changes nothing).

        Each event has ``step``, ``total_norm`` (``None`` if not finite), ``zscore``, ``loss``,
        ``loss_zscore``, ``clip_threshold``, ``level``, ``previous_level``, ``rung``, ``anomaly``,
        ``evidence``, ``actions``, ``lr_scale`` and ``rollback_check`` (``None``, or at the end of a rollback
        check its numbers and verdict: see :attr:`last_rollback_check`).
        """
        return [dict(event) for event in self._events]

    def events_since(self, recorded: int) -> list[dict[str, Any]]:
        """Events recorded after the first ``recorded`` ones (those still kept), for incremental writers."""
        missing = self.state.events_recorded - recorded
        kept = self._events[len(self._events) - min(missing, len(self._events)) :] if missing > 0 else []
        return [dict(event) for event in kept]

    @property
    def counts(self) -> dict[str, int]:
        """How often each action and anomaly happened (``clip``, ``skip``, ``amp_overflow``, ...)."""
        return dict(self.state.counts)

    @property
    def first_anomaly_steps(self) -> dict[str, int]:
        """The step at which each kind of anomaly was first seen."""
        return dict(self.state.first_anomaly_steps)

    def step(self, observation: Observation) -> Decision:
        """Judge one optimizer step and decide what to do with it."""
        state = self.state
        state.steps += 1
        if state.check_steps_left > 0:
            return self._score_snapshot(observation)
        unjudged = self._unjudged(observation)
        if unjudged is not None:
            return unjudged
        judgement = self._judge(observation)
        anomaly = judgement.anomaly
        previous_level, previous_lr_scale = state.level, state.lr_scale
        before_divergence = self._ladder_state() if anomaly == "divergence" else None
        lr = observation.lr if observation.lr is not None and observation.lr > 0 else None
        self._move_on_the_ladder(anomaly, lr, judgement.benign)
        adaptive_threshold, threshold, ceiling = self._clip_thresholds(judgement, observation)
        coefficient = 1.0
        if not judgement.nonfinite and math.isfinite(threshold) and judgement.norm > threshold:
            coefficient = threshold / judgement.norm
        diverged_loss = None
        if anomaly == "divergence" and judgement.learned_loss is not None:
            diverged_loss = self.loss_trend.smoothed_with(judgement.learned_loss)
        skip, rollback, stop = self._interventions(anomaly, previous_level, lr, diverged_loss)
        check = None
        if rollback and not stop and before_divergence is not None and judgement.learned_loss is not None:
            check = self._start_rollback_check(before_divergence, judgement.learned_loss)
        snapshot = self._snapshot_due(anomaly)
        if not judgement.nonfinite and not rollback:
            self._learn(judgement, adaptive_threshold, skipped=skip)
        self._keep_snapshot_bookkeeping(anomaly, snapshot)

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
        actions = decision.actions
        for action in actions:
            self._count(action)
        if "clip" in actions and threshold == ceiling:
            self._count("max_norm")  # the ceiling, not an anomaly, set this clip
        if anomaly is not None:
            self._count(anomaly)
            state.first_anomaly_steps.setdefault(anomaly, state.steps)
        if anomaly is not None or decision.skip or state.level != previous_level or state.lr_scale != previous_lr_scale:
            self._record(decision, judgement.norm, previous_level, judgement.loss)
        return decision

    def _start_rollback_check(self, before: dict[str, Any], loss: float) -> str | None:
        """Begin the check of a divergence's rollback (see :data:`ROLLBACK_CHECK_STEPS`); ``"start"``, or
        ``None`` when the snapshot has no loss to compare with."""
        state = self.state
        snapshot_loss = self.loss_trend.smoothed  # the rollback restored the trend the snapshot was taken with
        if not math.isfinite(snapshot_loss):
            return None
        trend = LossTrend(LOSS_HORIZON_STEPS)
        trend.load_state_dict(before["loss_trend"])
        state.check_snapshot_loss, state.check_diverged_loss = snapshot_loss, trend.smoothed_with(loss)
        state.check_rise = state.check_diverged_loss - trend.lowest
        state.check_steps_left, state.check_losses = ROLLBACK_CHECK_STEPS, 0
        state.check_loss_total = state.check_loss_squares = 0.0
        self._before_divergence = before
        return "start"

    def abandon_rollback_check(self) -> None:
        """The adapter could not keep the current state aside (no room, a failed write on some rank): the
        rollback stands as rollbacks did before the check existed, with its back-off."""
        if self.state.check_steps_left > 0:
            self.state.check_steps_left = 0
            self._before_divergence = None
            self._count("rollback_check_unavailable")

    def _score_snapshot(self, observation: Observation) -> Decision:
        """One step of a rollback check: skipped, its loss scoring the snapshot's weights on a new batch."""
        state = self.state
        loss = observation.loss
        if loss is not None and math.isfinite(loss) and not observation.nonfinite:
            state.check_loss_total += loss
            state.check_loss_squares += loss * loss
            state.check_losses += 1
        state.check_steps_left -= 1
        self._count("rollback_check")
        check = "score" if state.check_steps_left else self._conclude_rollback_check()
        decision = Decision(
            state.steps, state.level, None, 0.0, math.inf, skip=True, lr_scale=1.0, rollback_check=check
        )
        if check != "score":
            norm = observation.total_norm if not observation.nonfinite else math.inf
            self._record(decision, norm, self._check_level, loss)
        return decision

    def _conclude_rollback_check(self) -> str:
        """``"undo"`` or ``"keep"``: see :data:`ROLLBACK_CHECK_STEPS` and :data:`LOSS_NOISE_SIGMAS`.

        The rollback is undone when the snapshot scored the new batches more than half the rise that made the
        divergence above its own smoothed loss (the objective moved): the undo restores the ladder and the
        statistics from before the divergence and judges the loss from its new level. It is also undone, with
        the back-off kept, when the snapshot scored closer to the diverged loss than to its own (``no_better``).
        """
        state = self.state
        before, self._before_divergence = self._before_divergence, None
        self._check_level = state.level
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
        self.last_rollback_check = {
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
            counters = {name: getattr(state, name) for name in _LADDER_COUNTERS}
            self._load_ladder_state(before)
            for name, value in counters.items():
                setattr(state, name, value)
            self.loss_trend = LossTrend(LOSS_HORIZON_STEPS)
            self._count("rollback_no_better")
            return "undo"
        self._load_ladder_state(before)
        # the objective's new level is the reference from now on: the trend starts afresh
        # (its smoothed value still lags, and a reference taken from it would call the rest of a step a rise)
        self.loss_trend = LossTrend(LOSS_HORIZON_STEPS)
        state.objective_shifts += 1
        self._count("objective_shift")
        if state.objective_shifts >= OBJECTIVE_SHIFTS_TO_TRUST and state.divergence_off is None:
            state.divergence_off = (
                f"{state.objective_shifts} rollback checks found the loss rising with its objective (a schedule or "
                "a curriculum), not with the weights"
            )
            self._count("divergence_off")
        return "undo"

    def _ladder_state(self) -> dict[str, Any]:
        """What a rollback check that finds a moved objective puts back: the level, the back-off, the ceilings
        and every statistic as they were before the divergence verdict."""
        state = self.state
        return copy.deepcopy(
            {
                "counters": {name: getattr(state, name) for name in _LADDER_COUNTERS},
                "statistics": self._statistics_state(),
                "loss_trend": self.loss_trend.state_dict(),
                "growth": self.growth.state_dict(),
            }
        )

    def _load_ladder_state(self, saved: dict[str, Any]) -> None:
        for name, value in saved["counters"].items():
            setattr(self.state, name, value)
        self._load_statistics(saved["statistics"])
        self.loss_trend.load_state_dict(saved["loss_trend"])
        self.growth.load_state_dict(saved["growth"])

    def _unjudged(self, observation: Observation) -> Decision | None:
        """The decision for a step there is nothing to judge on (an fp16 overflow, an exactly zero gradient)."""
        state = self.state
        collapsed = self._scale_collapsed(observation)
        overflow = observation.loss_scale is not None and observation.nonfinite and not observation.rank_local
        if overflow and not collapsed:
            self._count("amp_overflow")  # GradScaler skips this step and lowers the scale itself
            return Decision(state.steps, state.level, "amp_overflow", 0.0, math.inf, lr_scale=1.0)
        if not observation.nonfinite and not collapsed and observation.total_norm == 0.0:
            # no gradient, no information (a frozen phase, a loss term not switched on yet): nothing to judge or
            # learn; the loss of such a step does not train anything either
            self._count("zero_gradient")
            return Decision(state.steps, state.level, None, 0.0, math.inf, lr_scale=state.lr_scale)
        return None

    def _judge(self, observation: Observation) -> _Judgement:
        """What this step's evidence says, against the statistics of the steps before it (the most severe
        anomaly wins: a collapsed loss scale, non-finite values, a loss spike, divergence, a gradient spike, an
        oversized SGD step, growth, drift)."""
        config = self.config
        collapsed = self._scale_collapsed(observation)
        norm, nonfinite = observation.total_norm, observation.nonfinite
        loss = observation.loss if observation.loss is not None and math.isfinite(observation.loss) else None
        unjudged_loss = loss is not None and not self.loss_rules_active
        if loss is not None and loss < 0 and config.loss_rules == "auto" and self.loss_rules_active:
            self.disable_loss_rules("a negative loss: not an objective bounded below by zero that should fall")
        if not self.loss_rules_active:
            loss = None  # nothing below judges it, and the statistics do not learn it
        zscore = 0.0 if nonfinite else self.statistics.zscore(norm)
        loss_zscore = 0.0
        if loss is not None and loss > 0 and config.loss_zscore_threshold is not None:
            loss_zscore = self.log_loss_statistics.zscore(loss)
        learned_loss = None if loss is None else min(loss, self._loss_threshold())
        warmup_threshold = self._warmup_threshold()
        update_threshold = self._update_threshold(observation)
        # a norm that drifts up while the loss keeps falling is a run whose gradients legitimately grew (weights
        # grow, a tanh net leaves its linear regime): the loss, not the norm, is what an explosion damages
        # (a loss the rules do not judge gives no evidence of damage either way: a new scale is learned)
        benign = unjudged_loss or (loss is not None and self.loss_trend.count > 0 and not self._loss_rising())
        drifting = not nonfinite and not benign and self.drift() > math.log(config.growth_factor)
        anomaly: str | None = None
        if collapsed:
            anomaly = "loss_scale_collapse"
        elif nonfinite:
            anomaly = "nonfinite"
        else:
            self.growth.push(norm)
            # a batch far outside the running loss is judged on its own first: it is skipped and never learned,
            # so it cannot make the smoothed loss look like a divergence
            if config.loss_zscore_threshold is not None and (
                loss_zscore > config.loss_zscore_threshold or (loss is not None and loss > self._loss_threshold())
            ):
                anomaly = "loss_spike"
            elif learned_loss is not None and self._diverging(learned_loss):
                anomaly = "divergence"
            elif zscore > config.zscore_threshold or norm > warmup_threshold:
                anomaly = "spike"
            elif norm > update_threshold:
                anomaly = "update_ratio"
            elif self.growth.growth_factor() > config.growth_factor:
                anomaly = "growth"
            elif drifting:
                anomaly = "drift"
        return _Judgement(
            norm, nonfinite, collapsed, loss, learned_loss, zscore, loss_zscore, warmup_threshold, update_threshold,
            drifting, benign, anomaly,
        )

    def _scale_collapsed(self, observation: Observation) -> bool:
        """The fp16 loss scale fell below ``loss_scale_floor``: the gradients overflow even unscaled."""
        return observation.loss_scale is not None and observation.loss_scale < self.config.loss_scale_floor

    def _move_on_the_ladder(self, anomaly: str | None, lr: float | None, benign: bool = False) -> None:
        """Escalate on an anomaly as far as its evidence allows, de-escalate after a healthy stretch, back off at
        once on a divergence.

        Gradient evidence climbs to ``tight_clip`` at most and a loss spike to ``skip`` at most (see
        :data:`DAMAGE_EVIDENCE`): an anomaly at its ceiling keeps the level where it is, so repeats of the same
        kind of evidence never reach a rung that costs more than the evidence justifies. A norm that is only
        unusual for its history (a spike, growth, drift) while the loss is ``benign`` (falling, or not an objective
        the rules judge) stays at ``clip``: the adaptive clip already caps each unusual step, and clipping *every*
        step to the typical norm changes the training of a run that shows no damage (a GAN's players, a model
        leaving a plateau). An oversized SGD step is measured against the weights, not the history: it may still
        tighten.
        """
        highest = _highest_rung(anomaly) if anomaly is not None else 0
        if anomaly in _SCALE_EVIDENCE and benign:
            highest = RUNGS.index("clip")
        if anomaly is None:
            self._on_healthy_step(lr)
        elif anomaly == "divergence":
            self._on_divergence(lr)
        elif self.state.level < min(highest, self.config.max_level):
            self._escalate(anomaly)
        else:
            self.state.healthy_streak = 0

    def _clip_thresholds(self, judgement: _Judgement, observation: Observation) -> tuple[float, float, float]:
        """``(adaptive, applied, ceiling)``: the spike threshold the statistics learn, the norm the step is
        clipped to at the current level, and the absolute ceiling among the bounds it is the minimum of."""
        state, config = self.state, self.config
        adaptive_threshold = min(self._adaptive_threshold(judgement.zscore), judgement.warmup_threshold)
        threshold, ceiling = adaptive_threshold, math.inf
        if state.level >= RUNGS.index("clip"):
            ceiling = self._norm_ceiling(observation)
            threshold = min(threshold, judgement.update_threshold, ceiling)
            if judgement.drifting:  # the edge of the band drift is judged by
                threshold = min(threshold, config.growth_factor * self.reference_norm)
        if state.level >= RUNGS.index("tight_clip") and self.statistics.warmed_up:
            typical = min(self.statistics.typical_norm, self.reference_norm)
            threshold = min(threshold, config.resolved("tight_clip_ratio") * typical)
        return adaptive_threshold, threshold, ceiling

    def _interventions(
        self, anomaly: str | None, previous_level: int, lr: float | None, diverged_loss: float | None = None
    ) -> tuple[bool, bool, bool]:
        """``(skip, rollback, stop)`` for this step; applies the level's learning-rate back-off and, on a rollback,
        the snapshot's statistics (``diverged_loss``: the smoothed loss with this step's, on a divergence)."""
        state, config = self.state, self.config
        # only evidence of damage acts above clipping, and a loss spike only on its own batch
        laddered = anomaly in DAMAGE_EVIDENCE and anomaly not in SKIP_ONLY_EVIDENCE
        anomalous_level = state.level if laddered else 0
        divergence = anomaly == "divergence"
        horizon = config.healthy_steps_to_deescalate
        state.recent_skips *= 1.0 - 1.0 / horizon
        spike_skip = anomaly == "loss_spike" and config.allows("skip")
        if spike_skip and state.recent_skips >= MAX_SKIP_FRACTION * horizon:
            spike_skip = False  # too many for the statistic to be right: clip this one, learn it (see _learn)
            self._count("skip_bound")
        skip = anomalous_level >= RUNGS.index("skip") or spike_skip or (divergence and config.allows("skip"))
        if spike_skip:
            state.recent_skips += 1.0
        if divergence:  # only to a snapshot whose own loss lies below the diverged one: else it cannot help
            rollback = state.has_snapshot and config.allows("rollback") and self._snapshot_below(diverged_loss)
        else:
            rollback = state.has_snapshot and anomalous_level == RUNGS.index("rollback")
        stop = anomalous_level == RUNGS.index("stop") or (divergence and state.lr_scale < MIN_LR_SCALE)
        if anomalous_level == RUNGS.index("lr_backoff") and not divergence:
            backed_off = state.lr_scale * config.resolved("backoff_factor")
            if backed_off < MIN_LR_SCALE:  # the floor: stop with the reason rather than freeze the run
                stop = True
            else:
                if previous_level < state.level:  # a new back-off episode: the scale it began at was too high
                    self._lower_ceiling(backed_off, lr)
                state.lr_scale = backed_off
        if rollback:
            self._restore_statistics()
        elif divergence:  # nothing to go back to: judge the next rise from here
            self.loss_trend.lowest = self.loss_trend.smoothed
        return skip, rollback, stop

    def _snapshot_due(self, anomaly: str | None) -> bool:
        """Whether the state before this step is a snapshot worth keeping: the initial state at least, then a
        healthy one every :meth:`_snapshot_interval` steps, never while the guard is acting or the loss is rising."""
        state, config = self.state, self.config
        return config.allows("rollback") and (
            (not state.has_snapshot and (anomaly is None or state.steps == 1))
            or (
                anomaly is None
                and (
                    state.steps_since_snapshot >= self._snapshot_interval()
                    and state.healthy_streak >= SNAPSHOT_HEALTHY_STREAK
                    and state.level < RUNGS.index("rollback")
                    and self._loss_near_lowest()
                )
            )
        )

    def _snapshot_interval(self) -> int:
        """Healthy steps between snapshots: ``snapshot_every``, and early in a run half the steps so far
        (see :data:`SNAPSHOT_HEALTHY_STREAK`): a rollback discards at most about half of the run's progress."""
        every = self.config.resolved("snapshot_every")
        return min(every, max(SNAPSHOT_HEALTHY_STREAK, self.state.steps // 2))

    def _snapshot_loss(self) -> float:
        """The smoothed loss the snapshot was taken at (``l_s``; nan when it has none)."""
        if self._trend_at_snapshot is None:
            return math.nan
        trend = LossTrend(LOSS_HORIZON_STEPS)
        trend.load_state_dict(self._trend_at_snapshot)
        return trend.smoothed

    def _snapshot_below(self, diverged_loss: float | None) -> bool:
        """Whether rolling back can lower the loss: the snapshot was taken at a smoothed loss below the diverged
        one. A snapshot older than the run's progress (the initial weights of a run that has since learned and then
        met harder data) scores at least what it scored then: restoring it would discard the progress and raise
        the loss. Without a loss to compare, a rollback is allowed as before."""
        snapshot_loss = self._snapshot_loss()
        if diverged_loss is None or not math.isfinite(snapshot_loss) or not math.isfinite(diverged_loss):
            return True
        return snapshot_loss < diverged_loss

    def _learn(self, judgement: _Judgement, adaptive_threshold: float, skipped: bool) -> None:
        """Fold this step into the statistics: the spike-clipped norm (not the tight clip's), healthy norms at
        rest into the long-horizon reference, and the clipped loss unless the loss itself was the anomaly."""
        state, anomaly, learned_loss = self.state, judgement.anomaly, judgement.learned_loss
        self.statistics.update(min(judgement.norm, adaptive_threshold))
        if anomaly is None and state.level <= self.base_level and self.reference is not None:
            self.reference.update(judgement.norm)  # an episode's norms are not the baseline
        self._follow_gradient_regime(anomaly, judgement.benign)
        if learned_loss is not None and (anomaly not in ("loss_spike", "divergence") or not skipped):
            # a loss spike that was not skipped (the skip bound) is part of the loss's distribution: learn it whole
            # _judge derives learned_loss from a non-None loss: with learned_loss set, judgement.loss is too
            assert judgement.loss is not None
            learned = judgement.loss if anomaly == "loss_spike" else learned_loss
            if state.first_loss is None:
                state.first_loss = learned
            self.loss_statistics.update(learned)
            if learned > 0:
                self.log_loss_statistics.update(learned)
            # the per-step noise once it is measured (the warm-up's exact Welford estimate); before, the margin is
            # the relative tolerance alone, which the early divergences of a run unstable from its start need
            noise = self.loss_statistics.std if self.loss_statistics.warmed_up else 0.0
            self.loss_trend.update(learned, healthy=anomaly is None, noise=noise)

    def _follow_gradient_regime(self, anomaly: str | None, benign: bool) -> None:
        """Move the gradient statistics to a new level when the norm has been unusual for :data:`REGIME_STEPS`
        steps in a row while the loss kept improving (or is not judged): a new scale, not an explosion. Without a
        loss there is no such evidence, and the statistics keep the scale they know."""
        state = self.state
        if anomaly not in _SCALE_EVIDENCE or not benign:
            state.gradient_anomaly_streak = 0
            return
        state.gradient_anomaly_streak += 1
        if state.gradient_anomaly_streak < REGIME_STEPS:
            return
        state.gradient_anomaly_streak = 0
        recent = list(self.growth.log_norms)[-REGIME_STEPS:]
        level = sum(recent) / len(recent)  # the new geometric-mean norm, in log space
        self.statistics.move_to(level)
        if self.reference is not None:
            self.reference.move_to(level)
        self.growth.clear()
        self._count("regime_change")

    def _keep_snapshot_bookkeeping(self, anomaly: str | None, snapshot: bool) -> None:
        """Remember the statistics that describe a new snapshot, and count the healthy steps since the last."""
        state = self.state
        if snapshot:
            state.has_snapshot, state.steps_since_snapshot, state.snapshot_step = True, 0, state.steps
            # this step's gradient and loss were computed on the snapshot's weights: they describe it
            self._statistics_at_snapshot = self._statistics_state()
            self._trend_at_snapshot = self.loss_trend.state_dict()
        elif anomaly is None:
            state.steps_since_snapshot += 1
        if (  # a snapshot taken in the warm-up: a rollback restores the first statistics since that can judge
            self._statistics_at_snapshot is not None
            and self._statistics_at_snapshot["statistics"]["count"] < self.config.warmup_steps
            and state.has_snapshot
            and anomaly is None
            and state.level <= self.base_level
            and self.statistics.warmed_up
        ):
            self._statistics_at_snapshot = self._statistics_state()

    def forget_snapshot(self) -> None:
        """The adapter has no snapshot (e.g. resumed from a checkpoint without one): request a new one."""
        self.state.has_snapshot, self.state.steps_since_snapshot = False, 0

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

    def _loss_threshold(self) -> float:
        """The loss above which a batch is a spike, and which a spike is clipped to before the statistics learn it:
        ``loss_zscore_threshold`` standard deviations above the running log-loss, or during the warm-up, before
        there is a spread, ``growth_factor`` x the geometric mean of the losses so far (the gradient's warm-up
        rule: a batch ten times as hard as every batch so far is not what the run is learning from)."""
        statistics, threshold = self.log_loss_statistics, self.config.loss_zscore_threshold
        if threshold is None or not statistics.count:
            return math.inf
        if not statistics.warmed_up:
            return self.config.growth_factor * statistics.typical_norm
        return statistics.norm_at(threshold)

    def _rise_margin(self) -> float:
        """How far above its lowest value the smoothed loss may lie before it is a divergence."""
        tolerance = self.config.loss_rise_tolerance
        if tolerance is None:
            return math.inf
        # the noise measured when the lowest value was reached (a climb inflates the running variance itself),
        # exact from the second loss on: a loss near zero is judged against its own spread, not against a
        # fraction of a value that is nearly nothing; and against the ground the run has covered (PROGRESS_SHARE)
        lowest, first = self.loss_trend.lowest, self.state.first_loss
        progress = first - lowest if first is not None and first > lowest else 0.0
        return max(
            tolerance * abs(lowest), LOSS_NOISE_SIGMAS * self.loss_trend.noise_at_lowest, PROGRESS_SHARE * progress
        )

    def _diverging(self, loss: float) -> bool:
        """Whether adding ``loss`` would lift the smoothed loss above its lowest value by more than the margin."""
        trend = self.loss_trend
        if self.config.loss_rise_tolerance is None or trend.count < 2 or not math.isfinite(trend.lowest):
            return False
        if self.state.divergence_off is not None:
            return False
        return trend.smoothed_with(loss) - trend.lowest > self._rise_margin()

    @property
    def loss_rules_active(self) -> bool:
        """Whether the loss rules (loss spikes, divergence) judge this run (see ``PolicyConfig.loss_rules``)."""
        rules = self.config.loss_rules
        return rules is True or (rules == "auto" and self.state.loss_rules_off is None)

    @property
    def loss_rules_off_reason(self) -> str | None:
        """Why ``loss_rules="auto"`` stopped judging the loss (``None`` while it judges, or when set by hand)."""
        return self.state.loss_rules_off

    def disable_loss_rules(self, reason: str) -> None:
        """Stop judging the loss under ``loss_rules="auto"``: it is not an objective that should fall.

        The adapter calls it for competing losses (several optimizers under manual optimization: a GAN); the
        policy itself on a negative loss. A no-op when ``loss_rules`` is ``True`` or ``False``.
        """
        if self.config.loss_rules == "auto" and self.state.loss_rules_off is None:
            self.state.loss_rules_off = reason
            self._count("loss_rules_off")
            self._withdraw_loss_verdicts()

    def _withdraw_loss_verdicts(self) -> None:
        """Take back what divergence verdicts did to the ladder once the loss turns out not to be an objective.

        A loss that can be negative (a policy gradient with a baseline, a log-ratio) was judged as one bounded
        below by zero until it showed its sign; a rise it made before that is no evidence of damage, so the
        back-off, the lowered ceiling and the level it caused are withdrawn. Only when the loss was the sole
        evidence that ever acted above clipping: a non-finite step or a collapsed loss scale keeps the ladder.
        """
        state = self.state
        counts = state.counts
        if not counts.get("divergence") or counts.get("nonfinite") or counts.get("loss_scale_collapse"):
            return
        state.level, state.anomalies_at_level = self.base_level, 0.0
        state.lr_scale, state.lr_ceiling, state.lr_ceiling_absolute = 1.0, 1.0, None
        self._count("loss_verdicts_withdrawn")

    def _loss_rising(self) -> bool:
        """Whether the smoothed loss is more than half the divergence margin above its lowest value."""
        return self.loss_trend.rise() > 0.5 * self._rise_margin()

    def _loss_near_lowest(self) -> bool:
        """Whether the smoothed loss lies within half the divergence margin of its lowest value, and within half
        its noise part (``LOSS_NOISE_SIGMAS / 2`` per-step loss standard deviations) when the relative tolerance is
        the wider: weights as good as the run has had, a state worth going back to. A climb the margin has not
        yet called (a divergence's first steps, which a tolerance of half the loss hides) is not."""
        rise = self.loss_trend.rise()
        # the noise when the lowest was reached (a climb inflates the running one); the running one when the lowest
        # dates from before the noise was measured
        noise = self.loss_trend.noise_at_lowest
        if noise <= 0.0 and self.loss_statistics.warmed_up:
            noise = self.loss_statistics.std
        return rise <= 0.0 or rise <= 0.5 * min(self._rise_margin(), LOSS_NOISE_SIGMAS * noise)

    def _warmup_threshold(self) -> float:
        """During the warm-up: ``growth_factor`` x the geometric mean of the (clipped) norms so far."""
        statistics = self.statistics
        if statistics.warmed_up or not statistics.count or self.state.level < RUNGS.index("clip"):
            return math.inf
        return self.config.growth_factor * statistics.typical_norm

    def _update_threshold(self, observation: Observation) -> float:
        """The gradient norm at which a plain SGD step moves the weights by ``max_update_ratio`` of their norm."""
        ratio, weight_norm, step_size = self.config.max_update_ratio, observation.weight_norm, observation.step_size
        if ratio is None or not weight_norm or not step_size or self.state.level < RUNGS.index("clip"):
            return math.inf
        return ratio * weight_norm / (step_size * self.state.lr_scale)

    def _norm_ceiling(self, observation: Observation) -> float:
        """The absolute gradient-norm ceiling for this optimizer (``inf``: none)."""
        max_norm = self.config.max_norm
        if max_norm == "auto":
            return SCALE_INVARIANT_MAX_NORM if observation.scale_invariant else math.inf
        return math.inf if max_norm is None else float(max_norm)

    def _statistics_state(self) -> dict[str, Any]:
        reference = None if self.reference is None else self.reference.state_dict()
        return {
            "statistics": self.statistics.state_dict(),
            "reference": reference,
            "loss_statistics": self.loss_statistics.state_dict(),
            "log_loss_statistics": self.log_loss_statistics.state_dict(),
        }

    def _restore_statistics(self) -> None:
        # after a rollback the weights are the snapshot's again: so are the statistics that describe them
        self.growth.clear()
        if self._trend_at_snapshot is not None:
            self.loss_trend.load_state_dict(self._trend_at_snapshot)
        if self._statistics_at_snapshot is not None:
            self._load_statistics(self._statistics_at_snapshot)

    def _load_statistics(self, saved: dict[str, Any]) -> None:
        self.statistics.load_state_dict(saved["statistics"])
        self.loss_statistics.load_state_dict(saved["loss_statistics"])
        if "log_loss_statistics" in saved:
            self.log_loss_statistics.load_state_dict(saved["log_loss_statistics"])
        if self.reference is not None and saved["reference"] is not None:
            self.reference.load_state_dict(saved["reference"])

    def lr_ceiling(self, lr: float | None = None) -> float:
        """The largest learning-rate multiplier the evidence supports for a scheduled learning rate ``lr``."""
        state = self.state
        if lr is not None and state.lr_ceiling_absolute is not None:
            return min(1.0, state.lr_ceiling_absolute / lr)
        return state.lr_ceiling

    def _lower_ceiling(self, scale: float, lr: float | None) -> None:
        state = self.state
        state.lr_ceiling = min(state.lr_ceiling, scale)
        if lr is not None:
            absolute = scale * lr
            previous = state.lr_ceiling_absolute
            state.lr_ceiling_absolute = absolute if previous is None else min(previous, absolute)

    def _on_healthy_step(self, lr: float | None) -> None:
        state, config = self.state, self.config
        state.healthy_streak += 1
        # a budget is a rate, not a lifetime count: anomalies as sparse as the healthy band's (ZClip clips ~1 % of
        # steps) drain away and never escalate; a burst of more than `budget` within about
        # `healthy_steps_to_deescalate` steps does
        drain = config.budget(state.level) / config.healthy_steps_to_deescalate
        state.anomalies_at_level = max(0.0, state.anomalies_at_level - drain)
        ceiling = self.lr_ceiling(lr)
        if state.lr_scale < ceiling:  # undo one back-off factor per lr_recovery_steps healthy steps
            recovery = (1.0 / config.resolved("backoff_factor")) ** (1.0 / config.resolved("lr_recovery_steps"))
            state.lr_scale = min(ceiling, state.lr_scale * recovery)
        else:  # a schedule that climbs above the rate that failed is held at it
            state.lr_scale = ceiling
        if state.healthy_streak >= config.healthy_steps_to_deescalate:
            state.healthy_streak = 0
            state.anomalies_at_level = 0
            if state.level > self.base_level:
                state.level -= 1
                self._count("deescalate")

    def _on_divergence(self, lr: float | None) -> None:
        # the step size is too large: back off at once, and never trust the diverging rate again
        state, config = self.state, self.config
        state.healthy_streak = 0
        if config.allows("lr_backoff"):
            state.lr_scale *= config.resolved("backoff_factor")
            self._lower_ceiling(state.lr_scale, lr)
        target = min(RUNGS.index("lr_backoff"), config.max_level)
        if state.level < target:
            state.level, state.anomalies_at_level = target, 0
            self._count("escalate")

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

    def _record(self, decision: Decision, norm: float, previous_level: int, loss: float | None) -> None:
        event = {
            "step": decision.step,
            "total_norm": norm if math.isfinite(norm) and decision.anomaly != "nonfinite" else None,
            "zscore": round(decision.zscore, 4),
            "loss": loss,
            "loss_zscore": round(decision.loss_zscore, 4),
            "clip_threshold": decision.clip_threshold if math.isfinite(decision.clip_threshold) else None,
            "level": decision.level,
            "previous_level": previous_level,
            "rung": decision.rung,
            "anomaly": decision.anomaly,
            "evidence": decision.evidence,
            "actions": decision.actions,
            "lr_scale": decision.lr_scale,
            "rollback_check": (
                dict(self.last_rollback_check or {}) if decision.rollback_check in ("undo", "keep") else None
            ),
        }
        self._events.append(event)
        self.state.events_recorded += 1
        del self._events[: -self.max_events]
        if decision.anomaly in EVIDENCE and decision.anomaly != "amp_overflow":
            self.worst_spikes.append(event)
            self.worst_spikes.sort(key=_severity, reverse=True)
            del self.worst_spikes[5:]

    def state_dict(self) -> dict[str, Any]:
        """Statistics, reference, loss trend, level, budgets used, LR scale, counts and events (versioned)."""
        return {
            "version": STATE_VERSION,
            **self._statistics_state(),
            "loss_trend": self.loss_trend.state_dict(),
            "statistics_at_snapshot": self._statistics_at_snapshot,
            "trend_at_snapshot": self._trend_at_snapshot,
            "growth": self.growth.state_dict(),
            "counters": asdict(self.state),
            "events": self.events,
            "worst_spikes": [dict(e) for e in self.worst_spikes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where a ``state_dict`` left off; a malformed state (a key missing, a value of the
        wrong type or out of range) raises ``ValueError`` naming the key before anything is loaded. Version 3,
        written by 0.1, resumes too: what it lacks (the log-space loss statistics, the counters added since)
        starts afresh."""
        from lightning_gradstab.state_checks import POLICY_OPTIONAL, check_state, policy_rules

        if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
            version = state.get("version") if isinstance(state, dict) else state
            raise ValueError(
                f"ExplosionPolicy state has version {version!r}; this code reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        template = ExplosionPolicy(self.config, self.max_events).state_dict()
        state = upgraded_policy_state(state, template)
        check_state(state, template, "ExplosionPolicy state", policy_rules(len(RUNGS)), POLICY_OPTIONAL)
        self.statistics.load_state_dict(state["statistics"])
        self.loss_statistics.load_state_dict(state["loss_statistics"])
        if "log_loss_statistics" in state:
            self.log_loss_statistics.load_state_dict(state["log_loss_statistics"])
        self.loss_trend.load_state_dict(state["loss_trend"])
        if self.reference is not None and state["reference"] is not None:
            self.reference.load_state_dict(state["reference"])
        self._statistics_at_snapshot = state["statistics_at_snapshot"]
        self._trend_at_snapshot = state["trend_at_snapshot"]
        self.growth.load_state_dict(state["growth"])
        counters = state["counters"]
        self.state = _Counters(
            **{
                **counters,
                "counts": dict(counters["counts"]),
                "first_anomaly_steps": dict(counters["first_anomaly_steps"]),
            }
        )
        self._events = [dict(e) for e in state["events"]]
        self.worst_spikes = [dict(e) for e in state["worst_spikes"]]
        # the state a rollback check kept aside is not in a checkpoint: a check cut short lets the rollback stand
        self.state.check_steps_left = 0
        self._before_divergence = None


STATE_VERSION = 6
"""Layout version of :meth:`ExplosionPolicy.state_dict` (3: loss statistics and trend, snapshot step; 4: log-space
loss statistics, the regime and skip-bound counters, why the loss rules are off; 5: the rollback check's counters
and why divergence is off; 6: the run's first loss)."""

READABLE_VERSIONS = (3, 4, 5, STATE_VERSION)
"""State versions :meth:`ExplosionPolicy.load_state_dict` resumes from (older ones gain what they lack, fresh)."""


_LADDER_COUNTERS = ("level", "anomalies_at_level", "healthy_streak", "lr_scale", "lr_ceiling", "lr_ceiling_absolute")
"""The counters a divergence verdict changes and an undone rollback check puts back."""

_GRADIENT_ONLY = frozenset(name for name, source in EVIDENCE.items() if source in ("gradient", "update"))
_GRADIENT_ONLY -= DAMAGE_EVIDENCE
_SCALE_EVIDENCE = frozenset({"spike", "growth", "drift"})
"""Gradient anomalies judged against the running norm statistics: the ones a new regime re-learns away (an oversized
SGD step is judged against the weights, which a re-learned norm scale does not change)."""


def _highest_rung(anomaly: str) -> int:
    """The highest level ``anomaly``'s evidence may escalate to (see :data:`DAMAGE_EVIDENCE`)."""
    if anomaly in _GRADIENT_ONLY:
        return RUNGS.index("tight_clip")
    if anomaly in SKIP_ONLY_EVIDENCE:
        return RUNGS.index("skip")
    return RUNGS.index("stop")


def upgraded_policy_state(state: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """``state`` of an older readable version with the parts added since taken from a fresh policy's
    ``template`` (the current version's state comes back as it is)."""
    if state.get("version") == STATE_VERSION:
        return state
    counters = state.get("counters")
    if isinstance(counters, dict):
        counters = {**template["counters"], **counters}
    return {**template, **state, "counters": counters, "version": STATE_VERSION}


def _severity(event: dict[str, Any]) -> float:
    return math.inf if event["total_norm"] is None else event["zscore"]
