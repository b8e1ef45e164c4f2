"""lightning_gradstab: measure, guard and diagnose gradient stability in Lightning training.

Example::

    import lightning.pytorch as pl
    from lightning_gradstab import GradNormMonitor

    trainer = pl.Trainer(callbacks=[GradNormMonitor()])
"""

from lightning_gradstab.callbacks.guard import ExplosionGuard, GradientExplosionError
from lightning_gradstab.callbacks.monitor import GradNormMonitor
from lightning_gradstab.stats import GradientStats, ParameterLayout, compute_gradient_stats

__all__ = [
    "ExplosionGuard",
    "GradientExplosionError",
    "GradNormMonitor",
    "GradientStats",
    "ParameterLayout",
    "compute_gradient_stats",
]
