"""Checks of state read back from a checkpoint, before any of it is used.

A checkpoint is input like any other: written by another version of the code, edited by hand, or cut short.
Loaded unchecked, a level of ``"3"`` fails at the first step with a ``TypeError`` far from its cause, an
``lr_scale`` of 0 freezes training without a word, and a missing key is a bare ``KeyError``. Every value is
therefore checked against the state a fresh object would save (its keys and their types) and against the
ranges its meaning allows, and the error names who owns the state, the key and the value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

Rule = tuple[Callable[[Any], bool], str]
"""A range check of one value: ``(predicate, what is accepted)``."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive(value: Any) -> bool:
    return _number(value) and math.isfinite(value) and value > 0


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def _non_negative(value: Any) -> bool:
    return _finite(value) and value >= 0


def policy_rules(levels: int) -> dict[str, Rule]:
    """The ranges of :class:`~lightning_gradstab.guard.ladder.ExplosionPolicy` state, keyed by dotted path (``*``: any
    key at that place); ``levels``: the number of rungs."""
    statistics = {"count": (_count, "an int >= 0"), "mean": (_finite, "a finite number"),
                  "variance": (_non_negative, "a finite number >= 0")}
    rules: dict[str, Rule] = {
        "counters.level": (
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < levels,
            f"an int rung level in [0, {levels - 1}]",
        ),
        "counters.lr_scale": (_positive, "a finite number > 0"),
        "counters.lr_ceiling": (_positive, "a finite number > 0"),
        "counters.lr_ceiling_absolute": (lambda v: v is None or _positive(v), "None or a finite number > 0"),
        "counters.first_loss": (lambda v: v is None or _finite(v), "None or a finite number"),
        "counters.skipped_spike_loss": (lambda v: v is None or _finite(v), "None or a finite number"),
        "counters.lr_ceiling_raised_step": (lambda v: v is None or _count(v), "None or an int >= 0"),
        "counters.outside_write_step": (lambda v: v is None or _count(v), "None or an int >= 0"),
        "counters.anomalies_at_level": (_non_negative, "a finite number >= 0"),
        "counters.counts.*": (_count, "an int >= 0"),
        "counters.first_anomaly_steps.*": (_count, "an int >= 0"),
        "growth.log_norms": (
            lambda v: isinstance(v, (list, tuple)) and all(_finite(x) for x in v), "a list of finite numbers"
        ),
        "loss_trend.weight_norm_at_lowest": (_non_negative, "a finite number >= 0"),
        "loss_trend.recent": (
            lambda v: isinstance(v, (list, tuple)) and all(_finite(x) for x in v), "a list of finite numbers"
        ),
    }
    for name in (
        "steps", "healthy_streak", "steps_since_snapshot", "snapshot_step", "events_recorded", "check_steps_left",
        "check_losses", "objective_shifts", "lr_ceiling_hold", "lr_ceiling_lowered_step",
    ):
        rules[f"counters.{name}"] = (_count, "an int >= 0")
    for part in ("statistics", "loss_statistics", "reference"):
        for key, rule in statistics.items():
            rules[f"{part}.{key}"] = rule
            rules[f"statistics_at_snapshot.{part}.{key}"] = rule
    return rules


POLICY_OPTIONAL = frozenset(
    {
        "reference", "statistics_at_snapshot", "trend_at_snapshot", "statistics_at_snapshot.reference",
        "counters.loss_rules_off", "counters.divergence_off", "counters.lr_ceiling_raised_step",
        "counters.outside_write_step",
    }
)
"""Parts of a policy's state that may be ``None`` whatever a fresh policy saves (drift detection off when the
checkpoint was written, no snapshot taken yet)."""


def check_state(
    state: Any,
    template: Mapping[str, Any],
    owner: str,
    rules: Mapping[str, Rule] | None = None,
    optional: frozenset[str] = frozenset(),
    prefix: str = "",
) -> None:
    """Raise ``ValueError`` naming ``owner``, the dotted key and the value unless ``state`` has every key of
    ``template`` (the state a fresh object saves), each of the template value's type, and every value with a
    rule in its range. Keys the template does not have are left alone (a newer writer's additions).
    ``rules`` and ``optional`` are keyed by paths within ``state``; ``prefix`` is where ``state`` sits in the
    owner's state, for the message (``"policies.0."``).

    Example::

        check_state(loaded, ExplosionPolicy(config).state_dict(), "ExplosionGuard checkpoint 'policies.0'",
                    policy_rules(len(RUNGS)), POLICY_OPTIONAL)
    """
    _check_mapping(state, template, owner, rules or {}, optional, prefix, "")


def _check_mapping(
    state: Any, template: Mapping[str, Any], owner: str, rules: Mapping[str, Rule], optional: frozenset[str],
    prefix: str, path: str,
) -> None:
    if not isinstance(state, Mapping):
        where = f"`{prefix}{path}`" if prefix or path else "the state"
        raise ValueError(f"{owner}: {where} must be a dict, got {_short(state)}")
    for key, expected in template.items():
        inner = f"{path}.{key}" if path else str(key)
        if key not in state:
            raise ValueError(
                f"{owner}: the key `{prefix}{inner}` is missing (a checkpoint of another version, or edited); "
                "resume without this callback's state to start it fresh"
            )
        _check_value(state[key], expected, owner, rules, optional, prefix, inner)


def _check_value(
    value: Any, expected: Any, owner: str, rules: Mapping[str, Rule], optional: frozenset[str], prefix: str, path: str
) -> None:
    rule = rules.get(path) or rules.get(path.rsplit(".", 1)[0] + ".*")
    if rule is not None:
        if not rule[0](value):
            raise ValueError(f"{owner}: `{prefix}{path}` must be {rule[1]}, got {_short(value)}")
        if not isinstance(expected, Mapping):
            return
    if value is None and (expected is None or path in optional):
        return
    if isinstance(expected, Mapping):
        _check_mapping(value, expected, owner, rules, optional, prefix, path)
        if not expected:  # a free-form mapping (counts by name): its values may still have a rule
            for key, item in value.items():
                _check_value(item, None, owner, rules, optional, prefix, f"{path}.{key}")
        return
    accepted = _accepted_type(expected)
    if accepted is not None and not accepted[0](value):
        raise ValueError(f"{owner}: `{prefix}{path}` must be {accepted[1]}, got {_short(value)}")


def _accepted_type(expected: Any) -> Rule | None:
    if isinstance(expected, bool):
        return (lambda v: isinstance(v, bool)), "a bool"
    if isinstance(expected, int):
        return (lambda v: isinstance(v, int) and not isinstance(v, bool)), "an int"
    if isinstance(expected, float):
        return _number, "a number"
    if isinstance(expected, str):
        return (lambda v: isinstance(v, str)), "a str"
    if isinstance(expected, (list, tuple)):
        return (lambda v: isinstance(v, (list, tuple))), "a list"
    return None  # None in the template: any value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
