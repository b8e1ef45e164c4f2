"""lightning_gradstab: measure, guard and diagnose gradient stability in Lightning training.

Example::

    import lightning.pytorch as pl
    from lightning_gradstab import ExplosionGuard, GradNormMonitor, PolicyConfig

    trainer = pl.Trainer(callbacks=[GradNormMonitor(), ExplosionGuard()])
    tuned = ExplosionGuard(max_rung="skip", config=PolicyConfig(growth_factor=3.0))  # every other option

Names are imported on first use, so ``diagnose`` and the ``gradstab`` CLI start without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_gradstab.adam_state import AdamEvidence, AdamStateTracker
    from lightning_gradstab.callbacks.advisor import ArchitectureAdvisor
    from lightning_gradstab.callbacks.guard import ExplosionGuard, GradientExplosionError
    from lightning_gradstab.callbacks.init_audit import InitAudit
    from lightning_gradstab.callbacks.monitor import GradNormMonitor
    from lightning_gradstab.console import get_verbosity, set_verbosity
    from lightning_gradstab.diagnosis import diagnose
    from lightning_gradstab.guard.config import PolicyConfig
    from lightning_gradstab.guard.snapshot import RollbackSnapshot
    from lightning_gradstab.guard_events import GuardEvent, GuardEventSource
    from lightning_gradstab.logits.qk_clip import AttentionLogitCap
    from lightning_gradstab.logits.watch import LogitWatch
    from lightning_gradstab.per_tensor_clip import AdaptiveTensorClip
    from lightning_gradstab.report import Finding, Report
    from lightning_gradstab.stats import GradientStats, ParameterLayout, compute_gradient_stats
    from lightning_gradstab.update_ceiling import RelativeUpdateCeiling

_EXPORTS = {
    "AdamEvidence": "lightning_gradstab.adam_state",
    "AdamStateTracker": "lightning_gradstab.adam_state",
    "AdaptiveTensorClip": "lightning_gradstab.per_tensor_clip",
    "ArchitectureAdvisor": "lightning_gradstab.callbacks.advisor",
    "AttentionLogitCap": "lightning_gradstab.logits.qk_clip",
    "ExplosionGuard": "lightning_gradstab.callbacks.guard",
    "Finding": "lightning_gradstab.report",
    "GradNormMonitor": "lightning_gradstab.callbacks.monitor",
    "GradientExplosionError": "lightning_gradstab.callbacks.guard",
    "GradientStats": "lightning_gradstab.stats",
    "GuardEvent": "lightning_gradstab.guard_events",
    "GuardEventSource": "lightning_gradstab.guard_events",
    "InitAudit": "lightning_gradstab.callbacks.init_audit",
    "LogitWatch": "lightning_gradstab.logits.watch",
    "ParameterLayout": "lightning_gradstab.stats",
    "PolicyConfig": "lightning_gradstab.guard.config",
    "RelativeUpdateCeiling": "lightning_gradstab.update_ceiling",
    "Report": "lightning_gradstab.report",
    "RollbackSnapshot": "lightning_gradstab.guard.snapshot",
    "compute_gradient_stats": "lightning_gradstab.stats",
    "diagnose": "lightning_gradstab.diagnosis",
    "get_verbosity": "lightning_gradstab.console",
    "set_verbosity": "lightning_gradstab.console",
}

__all__ = [
    "AdamEvidence",
    "AdamStateTracker",
    "AdaptiveTensorClip",
    "ArchitectureAdvisor",
    "AttentionLogitCap",
    "ExplosionGuard",
    "Finding",
    "GradNormMonitor",
    "GradientExplosionError",
    "GradientStats",
    "GuardEvent",
    "GuardEventSource",
    "InitAudit",
    "LogitWatch",
    "ParameterLayout",
    "PolicyConfig",
    "RelativeUpdateCeiling",
    "Report",
    "RollbackSnapshot",
    "compute_gradient_stats",
    "diagnose",
    "get_verbosity",
    "set_verbosity",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_gradstab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
