"""Argument checks for every public constructor: one message shape, naming the argument, the value and what
is accepted (``ValueError`` for a value out of range, ``TypeError`` for a value of the wrong kind).

Each check returns the value it accepted, so a constructor reads ``self.every = check_interval(every, "every")``.

Example::

    check_int(3, "window", 1)  # 3
    check_interval(None, "every")  # None: off
    # check_int(0, "window", 1) raises ValueError: `window` must be an int >= 1, got 0
"""

from __future__ import annotations

import math


def require(ok: bool, argument: str, value: object, accepted: str) -> None:
    """Raise ``ValueError("`argument` must be <accepted>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"`{argument}` must be {accepted}, got {value!r}")


def check_int(value: object, argument: str, minimum: int) -> int:
    """An ``int`` (not a bool) >= ``minimum``: ``TypeError`` for another type, ``ValueError`` below it."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"`{argument}` must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    require(value >= minimum, argument, value, f"an int >= {minimum}")
    return value


def check_interval(value: object, argument: str) -> int | None:
    """A step interval: a positive ``int``, or ``None`` for "off"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive int or None, got {value!r}")
    return value


def check_flag(value: object, argument: str) -> bool:
    """A ``bool`` (``"no"`` is not ``False``): ``TypeError`` otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"`{argument}` must be a bool, got {value!r}")
    return value


def check_open_interval(value: object, argument: str, low: float, high: float) -> float:
    """A real number strictly between ``low`` and ``high``, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        raise ValueError(f"`{argument}` must be a float in ({low:g}, {high:g}), got {value!r}")
    return float(value)


def check_positive(value: object, argument: str) -> float:
    """A finite real number > 0, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"`{argument}` must be a finite float > 0, got {value!r}")
    return float(value)
