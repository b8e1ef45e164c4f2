"""The guard's one event record, from the policy to the events file to the advisor, behind a small protocol.

The policy records each step it acted on or found anomalous as a :class:`GuardEvent`; the record travels as a
plain mapping (:meth:`GuardEvent.to_mapping`) wherever it must be serialised (checkpoints, the JSONL events
file, ``guard_events()``), and is read back with :meth:`GuardEvent.from_mapping`. A callback that acts on gradient
explosions (``ExplosionGuard``) implements :class:`GuardEventSource`; consumers (``ArchitectureAdvisor``) find
sources with ``isinstance(callback, GuardEventSource)`` and read typed events through
:func:`collect_guard_events`; they never import a callback module nor read a callback's attributes.

Example::

    event = GuardEvent.from_mapping({"step": 3, "level": 2, "previous_level": 1, "anomaly": "spike"})
    assert event.escalated and event.anomaly == "spike"
    assert GuardEvent.from_mapping(event.to_mapping()) == event
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

REQUIRED_KEYS: tuple[str, ...] = ("step", "level", "previous_level", "anomaly")
"""Keys every guard event carries; ``total_norm`` and ``clip_threshold`` may be absent or ``None``."""


@dataclass(frozen=True)
class GuardEvent:
    """One decision of the guard that it logged: the optimizer step, the evidence, the ladder and what it did.

    Args:
        step: optimizer step the decision was about.
        level: ladder level after the decision (an index into ``lightning_gradstab.guard.config.RUNGS``).
        previous_level: ladder level before it.
        anomaly: the anomaly detected (``"spike"``, ``"nonfinite"``, ``"growth"``, ...) or ``None``.
        total_norm: total gradient norm of the step (``None`` when it was not finite).
        clip_threshold: the clip threshold in force (``None`` when the step was not clipped).
        optimizer: index of the optimizer whose policy decided.
        zscore: the norm's log-space z-score against the running statistics.
        loss: the step's loss (``None`` when the step had none).
        loss_zscore: the loss's z-score against its running statistics.
        rung: the name of ``level``.
        evidence: the kind of evidence the anomaly is (``"gradient"``, ``"loss"``, ...), or ``None``.
        actions: what the guard did, lowest rung first (``"clip"``, ``"skip"``, ``"rollback"``, ...).
        lr_scale: the learning-rate multiplier after the decision.
        rollback_check: at the end of a rollback check, its numbers and verdict; else ``None``.

    Example::

        GuardEvent(step=3, level=2, previous_level=1, anomaly="spike", total_norm=1e5, clip_threshold=1.0)
    """

    step: int
    level: int
    previous_level: int
    anomaly: str | None
    total_norm: float | None = None
    clip_threshold: float | None = None
    optimizer: int = 0
    zscore: float = 0.0
    loss: float | None = None
    loss_zscore: float = 0.0
    rung: str | None = None
    evidence: str | None = None
    actions: tuple[str, ...] = ()
    lr_scale: float = 1.0
    rollback_check: Mapping[str, Any] | None = None

    @classmethod
    def from_mapping(cls, event: Mapping[str, Any]) -> GuardEvent:
        """Read one event of ``guard_events()``; a missing required key is a broken contract (``KeyError``).

        Example::

            GuardEvent.from_mapping({"step": 1, "level": 1, "previous_level": 1, "anomaly": None})
        """
        missing = [key for key in REQUIRED_KEYS if key not in event]
        if missing:
            raise KeyError(f"guard event {dict(event)!r} lacks the keys {missing} of the GuardEvent contract")
        check = event.get("rollback_check")
        return cls(
            step=int(event["step"]),
            level=int(event["level"]),
            previous_level=int(event["previous_level"]),
            anomaly=None if event["anomaly"] is None else str(event["anomaly"]),
            total_norm=event.get("total_norm"),
            clip_threshold=event.get("clip_threshold"),
            optimizer=int(event.get("optimizer", 0)),
            zscore=event.get("zscore", 0.0),
            loss=event.get("loss"),
            loss_zscore=event.get("loss_zscore", 0.0),
            rung=event.get("rung"),
            evidence=event.get("evidence"),
            actions=tuple(event.get("actions", ())),
            lr_scale=event.get("lr_scale", 1.0),
            rollback_check=None if check is None else dict(check),
        )

    def to_mapping(self, with_optimizer: bool = False) -> dict[str, Any]:
        """The event as the plain dict that checkpoints, the events file and ``guard_events()`` carry (the keys of
        :attr:`~lightning_gradstab.guard.event_log.EventLog.events`; ``optimizer`` first when asked).

        Example::

            GuardEvent(step=1, level=1, previous_level=1, anomaly=None).to_mapping()["rung"]  # None
        """
        mapping: dict[str, Any] = {"optimizer": self.optimizer} if with_optimizer else {}
        mapping.update(
            step=self.step,
            total_norm=self.total_norm,
            zscore=self.zscore,
            loss=self.loss,
            loss_zscore=self.loss_zscore,
            clip_threshold=self.clip_threshold,
            level=self.level,
            previous_level=self.previous_level,
            rung=self.rung,
            anomaly=self.anomaly,
            evidence=self.evidence,
            actions=list(self.actions),
            lr_scale=self.lr_scale,
            rollback_check=None if self.rollback_check is None else dict(self.rollback_check),
        )
        return mapping

    @property
    def escalated(self) -> bool:
        """Whether the decision moved the ladder up."""
        return self.level > self.previous_level


@runtime_checkable
class GuardEventSource(Protocol):
    """A callback that logs guard decisions: ``guard_events()`` returns them oldest first, as plain mappings."""

    def guard_events(self) -> Sequence[Mapping[str, Any]]:
        """The kept events, each with at least the keys of :data:`REQUIRED_KEYS`."""
        ...


def collect_guard_events(callbacks: Sequence[object]) -> list[GuardEvent]:
    """Every event of every :class:`GuardEventSource` among ``callbacks``, typed.

    Example::

        events = collect_guard_events(trainer.callbacks)
    """
    events: list[GuardEvent] = []
    for callback in callbacks:
        if isinstance(callback, GuardEventSource):
            events += [GuardEvent.from_mapping(event) for event in callback.guard_events()]
    return events
