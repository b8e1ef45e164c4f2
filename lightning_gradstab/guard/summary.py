"""What the guard did in a fit, as one typed record: the end-of-fit table, the suite's summary and the summary
file all read a :class:`GuardSummary`; :meth:`GuardSummary.to_mapping` is its plain-data (JSON) form, the one
``ExplosionGuard.summary()`` returns and ``gradstab_guard_summary.json`` holds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_gradstab.guard_events import GuardEvent


@dataclass(frozen=True)
class OptimizerSummary:
    """What one optimizer's policy did (the defaults: a policy that never acted).

    Args:
        final_level: the ladder level the run ended at, and ``final_rung`` its name.
        lr_scale: the learning-rate multiplier the run ended at after back-offs.
        final_lr: the first param group's learning rate times ``lr_scale`` (``None`` when unknown).
        counts: actions and anomalies by name.
        evidence: anomaly counts by what they were seen in (gradient, loss, update, loss scale).
        first_anomaly_steps: the first step of each anomaly.
        worst_spikes: the five most severe anomalies' events.
        advice: concrete configuration changes that would have avoided what the guard had to do.
    """

    final_level: int = 0
    final_rung: str = "observe"
    lr_scale: float = 1.0
    final_lr: float | None = None
    counts: Mapping[str, int] = field(default_factory=dict)
    evidence: Mapping[str, int] = field(default_factory=dict)
    first_anomaly_steps: Mapping[str, int] = field(default_factory=dict)
    worst_spikes: tuple[GuardEvent, ...] = ()
    advice: tuple[str, ...] = ()

    def to_mapping(self) -> dict[str, Any]:
        """The plain-data form (the summary file's per-optimizer entry)."""
        return {
            "final_level": self.final_level,
            "final_rung": self.final_rung,
            "lr_scale": self.lr_scale,
            "final_lr": self.final_lr,
            "counts": dict(self.counts),
            "evidence": dict(self.evidence),
            "first_anomaly_steps": dict(self.first_anomaly_steps),
            "worst_spikes": [event.to_mapping() for event in self.worst_spikes],
            "advice": list(self.advice),
        }

    @classmethod
    def from_mapping(cls, entry: Mapping[str, Any]) -> OptimizerSummary:
        """Read a per-optimizer entry of :meth:`to_mapping` (a missing key takes the field's default)."""
        return cls(
            final_level=int(entry.get("final_level", 0)),
            final_rung=str(entry.get("final_rung", "observe")),
            lr_scale=float(entry.get("lr_scale", 1.0)),
            final_lr=entry.get("final_lr"),
            counts=dict(entry.get("counts", {})),
            evidence=dict(entry.get("evidence", {})),
            first_anomaly_steps=dict(entry.get("first_anomaly_steps", {})),
            worst_spikes=tuple(GuardEvent.from_mapping(e) for e in entry.get("worst_spikes", ())),
            advice=tuple(entry.get("advice", ())),
        )


@dataclass(frozen=True)
class GuardSummary:
    """What one guard did in a fit: whether it stopped the run and why, and each optimizer's account.

    Example::

        summary = GuardSummary(stopped=False, stop_reason=None)
        assert GuardSummary.from_mapping(summary.to_mapping()) == summary
    """

    stopped: bool
    stop_reason: str | None
    optimizers: Mapping[int, OptimizerSummary] = field(default_factory=dict)

    def to_mapping(self) -> dict[str, Any]:
        """The plain-data form: ``ExplosionGuard.summary()`` and ``gradstab_guard_summary.json`` (optimizer
        indices as strings, as JSON keys are)."""
        return {
            "stopped": self.stopped,
            "stop_reason": self.stop_reason,
            "optimizers": {str(index): entry.to_mapping() for index, entry in sorted(self.optimizers.items())},
        }

    @classmethod
    def from_mapping(cls, summary: Mapping[str, Any]) -> GuardSummary:
        """Read :meth:`to_mapping`'s form (a summary file, or ``ExplosionGuard.summary()``)."""
        return cls(
            stopped=bool(summary.get("stopped", False)),
            stop_reason=summary.get("stop_reason"),
            optimizers={
                int(index): OptimizerSummary.from_mapping(entry)
                for index, entry in summary.get("optimizers", {}).items()
            },
        )
