"""lightning_gradstab: measure, guard and diagnose gradient stability in Lightning training.

Example::

    import lightning.pytorch as pl
    from lightning_gradstab import GradNormMonitor

    trainer = pl.Trainer(callbacks=[GradNormMonitor()])
"""

from lightning_gradstab.callbacks.advisor import ArchitectureAdvisor
from lightning_gradstab.callbacks.guard import ExplosionGuard, GradientExplosionError
from lightning_gradstab.callbacks.init_audit import InitAudit
from lightning_gradstab.callbacks.monitor import GradNormMonitor
from lightning_gradstab.diagnosis import diagnose
from lightning_gradstab.report import Finding, Report
from lightning_gradstab.stats import GradientStats, ParameterLayout, compute_gradient_stats

__all__ = [
    "ArchitectureAdvisor",
    "ExplosionGuard",
    "Finding",
    "GradNormMonitor",
    "GradientExplosionError",
    "GradientStats",
    "InitAudit",
    "ParameterLayout",
    "Report",
    "compute_gradient_stats",
    "diagnose",
]
