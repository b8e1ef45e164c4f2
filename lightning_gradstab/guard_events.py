"""What the guard tells the rest of the suite: its event log as typed records, behind a small protocol.

A callback that acts on gradient explosions (``ExplosionGuard``) implements :class:`GuardEventSource`:
``guard_events()`` returns its kept events as plain mappings with the keys documented on
:attr:`lightning_gradstab.guard.event_log.EventLog.events`. Consumers (``ArchitectureAdvisor``) find sources with
``isinstance(callback, GuardEventSource)`` and read the events through :meth:`GuardEvent.from_mapping`; they
never import a callback module nor read a callback's attributes.

Example::

    event = GuardEvent.from_mapping({"step": 3, "level": 2, "previous_level": 1, "anomaly": "spike"})
    assert event.escalated and event.anomaly == "spike"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

REQUIRED_KEYS: tuple[str, ...] = ("step", "level", "previous_level", "anomaly")
"""Keys every guard event carries; ``total_norm`` and ``clip_threshold`` may be absent or ``None``."""


@dataclass(frozen=True)
class GuardEvent:
    """One decision of the guard that it logged: the optimizer step, the ladder levels and the anomaly seen.

    Args:
        step: optimizer step the decision was about.
        level: ladder level after the decision (an index into ``lightning_gradstab.guard.config.RUNGS``).
        previous_level: ladder level before it.
        anomaly: the anomaly detected (``"spike"``, ``"nonfinite"``, ``"growth"``, ...) or ``None``.
        total_norm: total gradient norm of the step (``None`` when it was not finite).
        clip_threshold: the clip threshold in force (``None`` when the step was not clipped).
        optimizer: index of the optimizer whose policy decided.

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

    @classmethod
    def from_mapping(cls, event: Mapping[str, Any]) -> GuardEvent:
        """Read one event of ``guard_events()``; a missing required key is a broken contract (``KeyError``).

        Example::

            GuardEvent.from_mapping({"step": 1, "level": 1, "previous_level": 1, "anomaly": None})
        """
        missing = [key for key in REQUIRED_KEYS if key not in event]
        if missing:
            raise KeyError(f"guard event {dict(event)!r} lacks the keys {missing} of the GuardEvent contract")
        return cls(
            step=int(event["step"]),
            level=int(event["level"]),
            previous_level=int(event["previous_level"]),
            anomaly=None if event["anomaly"] is None else str(event["anomaly"]),
            total_norm=event.get("total_norm"),
            clip_threshold=event.get("clip_threshold"),
            optimizer=int(event.get("optimizer", 0)),
        )

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
