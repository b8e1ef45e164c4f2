"""The guard's configuration: the ladder's rungs, the budgets, what each anomaly is evidence of, and
:class:`PolicyConfig`, every threshold and budget of one optimizer's policy, validated on construction.

The rungs, lowest first, are described in :mod:`lightning_gradstab.guard.ladder`; the evidence each anomaly is
judged on in :mod:`lightning_gradstab.guard.detect`. The tables below say which rungs each kind of evidence may
reach: the configuration of the ladder that no option changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from lightning_gradstab.arguments import check_int, require

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

GRADIENT_ONLY_EVIDENCE: frozenset[str] = frozenset(
    name for name, source in EVIDENCE.items() if source in ("gradient", "update")
) - DAMAGE_EVIDENCE
"""Gradient and update anomalies, which show no damage: they may clip, up to ``tight_clip`` (see
:data:`DAMAGE_EVIDENCE`)."""

SCALE_EVIDENCE: frozenset[str] = frozenset({"spike", "growth", "drift"})
"""Gradient anomalies judged against the running norm statistics: the ones a new regime re-learns away (an oversized
SGD step is judged against the weights, which a re-learned norm scale does not change)."""

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
            observation says so, see :attr:`~lightning_gradstab.guard.detect.Observation.scale_invariant`), none
            for the others; ``None``: none.
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
