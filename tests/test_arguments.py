"""The argument checks every constructor uses: what each accepts, and a message naming the argument, the value
and what is accepted."""

from __future__ import annotations

import math

import pytest

from lightning_gradstab.arguments import (
    check_flag,
    check_int,
    check_interval,
    check_open_interval,
    check_positive,
    require,
)


def test_each_check_returns_the_value_it_accepts():
    assert check_int(3, "window", 1) == 3
    assert check_interval(None, "every") is None and check_interval(5, "every") == 5
    assert check_flag(False, "fix") is False
    assert check_open_interval(1, "beta", 0.0, 2.0) == 1.0 and isinstance(check_open_interval(1, "b", 0, 2), float)
    assert check_positive(2, "scale") == 2.0


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: require(False, "level", 9, "a rung name"), ValueError, "`level` must be a rung name, got 9"),
        (lambda: check_int(0, "window", 1), ValueError, "`window` must be an int >= 1, got 0"),
        (lambda: check_int(2.0, "window", 1), TypeError, "`window` must be an int >= 1, got float 2.0"),
        (lambda: check_int(True, "window", 0), TypeError, "`window` must be an int >= 0, got bool True"),
        (lambda: check_interval(0, "every"), ValueError, "`every` must be a positive int or None, got 0"),
        (lambda: check_interval(True, "every"), ValueError, "`every` must be a positive int or None, got True"),
        (lambda: check_flag("no", "fix"), TypeError, "`fix` must be a bool, got 'no'"),
        (lambda: check_open_interval(1.0, "beta", 0.0, 1.0), ValueError, "`beta` must be a float in (0, 1), got 1.0"),
        (lambda: check_positive(math.inf, "scale"), ValueError, "`scale` must be a finite float > 0, got inf"),
        (lambda: check_positive(math.nan, "scale"), ValueError, "`scale` must be a finite float > 0, got nan"),
    ],
)
def test_a_refused_value_is_named_with_what_is_accepted(call, error, message):
    with pytest.raises(error) as raised:
        call()
    assert str(raised.value) == message
