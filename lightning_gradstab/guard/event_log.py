"""The policy's event log: one record per step the guard acted on or found anomalous, the latest kept, and the
five most severe anomalies of the run.

An event is a :class:`~lightning_gradstab.guard_events.GuardEvent`, the one record the policy, the events file
and the advisor share; it travels in checkpoints and JSON logs as the plain dict of
:meth:`~lightning_gradstab.guard_events.GuardEvent.to_mapping`, whose keys :attr:`EventLog.events` describes.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_gradstab.guard.config import EVIDENCE
from lightning_gradstab.guard.decision import Decision
from lightning_gradstab.guard_events import GuardEvent


class EventLog:
    """The latest ``max_events`` events, oldest first, and the worst anomalies (non-finite first, then by z-score).

    Args:
        max_events: events kept (oldest dropped first).
    """

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._events: list[GuardEvent] = []
        self._worst: list[GuardEvent] = []

    @property
    def records(self) -> list[GuardEvent]:
        """The kept events, oldest first, typed."""
        return list(self._events)

    @property
    def worst_records(self) -> list[GuardEvent]:
        """The five most severe anomalies' events (non-finite first, then by z-score), typed."""
        return list(self._worst)

    @property
    def worst_spikes(self) -> list[dict[str, Any]]:
        """The five most severe anomalies' events (non-finite first, then by z-score), as plain dicts."""
        return [event.to_mapping() for event in self._worst]

    @property
    def events(self) -> list[dict[str, Any]]:
        """The kept event log, oldest first (copies: editing them changes nothing).

        Each event has ``step``, ``total_norm`` (``None`` if not finite), ``zscore``, ``loss``,
        ``loss_zscore``, ``clip_threshold``, ``level``, ``previous_level``, ``rung``, ``anomaly``,
        ``evidence``, ``actions``, ``lr_scale`` and ``rollback_check`` (``None``, or at the end of a rollback
        check its numbers and verdict: see
        :attr:`~lightning_gradstab.guard.rollback_check.RollbackCheck.last`).
        """
        return [event.to_mapping() for event in self._events]

    def latest(self, missing: int) -> list[dict[str, Any]]:
        """Copies of the last ``missing`` events, those still kept."""
        kept = self._events[len(self._events) - min(missing, len(self._events)) :] if missing > 0 else []
        return [event.to_mapping() for event in kept]

    def record(
        self,
        decision: Decision,
        norm: float,
        previous_level: int,
        loss: float | None,
        rollback_check: dict[str, Any] | None,
    ) -> None:
        """Add the event of ``decision`` (``rollback_check``: the numbers of the check it concludes, if any)."""
        event = GuardEvent(
            step=decision.step,
            total_norm=norm if math.isfinite(norm) and decision.anomaly != "nonfinite" else None,
            zscore=round(decision.zscore, 4),
            loss=loss,
            loss_zscore=round(decision.loss_zscore, 4),
            clip_threshold=decision.clip_threshold if math.isfinite(decision.clip_threshold) else None,
            level=decision.level,
            previous_level=previous_level,
            rung=decision.rung,
            anomaly=decision.anomaly,
            evidence=decision.evidence,
            actions=tuple(decision.actions),
            lr_scale=decision.lr_scale,
            rollback_check=dict(rollback_check or {}) if decision.rollback_check in ("undo", "keep") else None,
        )
        self._events.append(event)
        del self._events[: -self.max_events]
        if decision.anomaly in EVIDENCE and decision.anomaly != "amp_overflow":
            self._worst.append(event)
            self._worst.sort(key=_severity, reverse=True)
            del self._worst[5:]

    def load(self, events: list[dict[str, Any]], worst_spikes: list[dict[str, Any]]) -> None:
        """Continue from the ``events`` and ``worst_spikes`` of a saved state."""
        self._events = [GuardEvent.from_mapping(e) for e in events]
        self._worst = [GuardEvent.from_mapping(e) for e in worst_spikes]


def _severity(event: GuardEvent) -> float:
    return math.inf if event.total_norm is None else event.zscore
