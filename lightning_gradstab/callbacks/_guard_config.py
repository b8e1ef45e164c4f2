"""How :class:`~lightning_gradstab.ExplosionGuard`'s arguments become one :class:`PolicyConfig`.

The guard names the two knobs a person tunes (``max_rung``, ``max_norm``) and takes every other threshold and
budget in ``config``; each option's default and validation live in :class:`PolicyConfig` only. The old keyword
arguments (one per policy option) still work: they are routed into the config with a deprecation warning that
names the new spelling. Kept apart from ``guard.py`` so the callback holds the hooks, not the argument plumbing.

Example::

    config = guard_config(None, "clip", "auto", {})  # PolicyConfig(max_rung="clip")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_deprecation
from lightning.pytorch.utilities.rank_zero import LightningDeprecationWarning

from lightning_gradstab.guard.config import PolicyConfig

NAMED = ("max_rung", "max_norm")
"""The policy options the guard's signature names; they default to :class:`PolicyConfig`'s defaults."""

MOVED_TO_CONFIG = (
    "zscore_threshold",
    "ema_decay",
    "warmup_steps",
    "log_std_floor",
    "growth_window",
    "growth_factor",
    "drift_horizon_steps",
    "healthy_steps_to_deescalate",
    "loss_scale_floor",
    "loss_zscore_threshold",
    "loss_rise_tolerance",
    "max_update_ratio",
    "budgets",
    "tight_clip_ratio",
    "backoff_factor",
    "lr_recovery_steps",
    "snapshot_every",
)
"""The guard's former keyword arguments that are :class:`PolicyConfig` options now (deprecated as arguments)."""

_DEFAULTS = PolicyConfig()


class GradstabDeprecationWarning(LightningDeprecationWarning):
    """A deprecated use of ``lightning_gradstab``: shown by default, like Lightning's own deprecations."""


def _plain(value: Any) -> Any:
    """A mapping (a Hydra ``DictConfig`` too) as a ``dict``; anything else as it is."""
    return dict(value) if isinstance(value, Mapping) else value


def policy_config(config: PolicyConfig | Mapping[str, Any] | None) -> PolicyConfig:
    """``config`` as a :class:`PolicyConfig`: a mapping (a YAML node) is passed to its constructor."""
    if config is None:
        return _DEFAULTS
    if isinstance(config, PolicyConfig):
        return config
    if isinstance(config, Mapping):
        return PolicyConfig(**{str(key): _plain(value) for key, value in config.items()})
    raise TypeError(f"`config` must be a PolicyConfig, a mapping of its options or None, got {config!r}")


def guard_config(
    config: PolicyConfig | Mapping[str, Any] | None,
    max_rung: str,
    max_norm: Any,
    deprecated: Mapping[str, Any],
) -> PolicyConfig:
    """The guard's :class:`PolicyConfig`: ``config`` with the named knobs and the deprecated arguments applied.

    A named knob left at its default defers to ``config``; set away from it while ``config`` sets the same
    option to another value, it is a contradiction (``ValueError`` naming both). A deprecated argument warns,
    names the new spelling and is applied like a named knob. An unknown argument is a ``TypeError``.
    """
    unknown = [name for name in deprecated if name not in MOVED_TO_CONFIG]
    if unknown:
        raise TypeError(f"ExplosionGuard.__init__() got an unexpected keyword argument {unknown[0]!r}")
    base = policy_config(config)
    direct: dict[str, Any] = {
        name: value for name, value in zip(NAMED, (max_rung, max_norm), strict=True)
        if value != getattr(_DEFAULTS, name)
    }
    for name, value in deprecated.items():
        rank_zero_deprecation(
            f"ExplosionGuard({name}=...) is deprecated: pass config=PolicyConfig({name}=...) instead "
            "(`from lightning_gradstab import PolicyConfig`; in YAML, `config: {" + name + ": ...}`). The keyword "
            "argument will be removed in a future release.",
            stacklevel=7,  # the line that built the guard
            category=GradstabDeprecationWarning,
        )
        direct[name] = _plain(value)  # a Hydra DictConfig of budgets too
    for name, value in direct.items():
        configured = getattr(base, name)
        if configured != getattr(_DEFAULTS, name) and configured != value:
            raise ValueError(
                f"`{name}`={value!r} and `config.{name}`={configured!r} contradict each other: set `{name}` in one "
                "place"
            )
    return dataclasses.replace(base, **direct) if direct else base
