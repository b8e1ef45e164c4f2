"""The policy's event log: one record per step the guard acted on or found anomalous, the latest kept, and the
five most severe anomalies of the run.

An event is a plain dict (it travels in checkpoints and JSON logs); its keys are described in
:attr:`EventLog.events`. :class:`~lightning_gradstab.guard_events.GuardEvent` is the typed view consumers read.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_gradstab.guard.config import EVIDENCE
from lightning_gradstab.guard.decision import Decision


class EventLog:
    """The latest ``max_events`` events, oldest first, and the worst anomalies (non-finite first, then by z-score).

    Args:
        max_events: events kept (oldest dropped first).
    """

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._events: list[dict[str, Any]] = []
        self.worst_spikes: list[dict[str, Any]] = []

    @property
    def events(self) -> list[dict[str, Any]]:
        """The kept event log, oldest first (copies: editing them changes nothing).

        Each event has ``step``, ``total_norm`` (``None`` if not finite), ``zscore``, ``loss``,
        ``loss_zscore``, ``clip_threshold``, ``level``, ``previous_level``, ``rung``, ``anomaly``,
        ``evidence``, ``actions``, ``lr_scale`` and ``rollback_check`` (``None``, or at the end of a rollback
        check its numbers and verdict: see
        :attr:`~lightning_gradstab.guard.rollback_check.RollbackCheck.last`).
        """
        return [dict(event) for event in self._events]

    def latest(self, missing: int) -> list[dict[str, Any]]:
        """Copies of the last ``missing`` events, those still kept."""
        kept = self._events[len(self._events) - min(missing, len(self._events)) :] if missing > 0 else []
        return [dict(event) for event in kept]

    def record(
        self,
        decision: Decision,
        norm: float,
        previous_level: int,
        loss: float | None,
        rollback_check: dict[str, Any] | None,
    ) -> None:
        """Add the event of ``decision`` (``rollback_check``: the numbers of the check it concludes, if any)."""
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
                dict(rollback_check or {}) if decision.rollback_check in ("undo", "keep") else None
            ),
        }
        self._events.append(event)
        del self._events[: -self.max_events]
        if decision.anomaly in EVIDENCE and decision.anomaly != "amp_overflow":
            self.worst_spikes.append(event)
            self.worst_spikes.sort(key=_severity, reverse=True)
            del self.worst_spikes[5:]

    def load(self, events: list[dict[str, Any]], worst_spikes: list[dict[str, Any]]) -> None:
        """Continue from the ``events`` and ``worst_spikes`` of a saved state."""
        self._events = [dict(e) for e in events]
        self.worst_spikes = [dict(e) for e in worst_spikes]


def _severity(event: dict[str, Any]) -> float:
    return math.inf if event["total_norm"] is None else event["zscore"]
