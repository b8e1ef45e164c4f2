"""The guard's per-step host-side helpers give what their plain versions give, bit for bit: GrowthWindow keeps its
pairwise slopes sorted as the window slides (the growth factor of a Theil-Sen fit recomputed from scratch), and
RankReduction reads a single process's values with one stack (what the staging vector gives)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from lightning_gradstab.running import FLOAT32_MAX, GROWTH_FIT_POINTS, GrowthWindow, RankReduction


def _reference(log_norms: list[float], window_steps: int) -> float:
    """The fit recomputed from scratch (the implementation before the sorted slopes were kept)."""
    n = len(log_norms)
    if n < window_steps:
        return 1.0

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])

    values = list(log_norms)
    if n <= GROWTH_FIT_POINTS:
        steps, levels = list(range(n)), values
    else:
        bounds = [n * block // GROWTH_FIT_POINTS for block in range(GROWTH_FIT_POINTS + 1)]
        steps = [0.5 * (start + end - 1) for start, end in itertools.pairwise(bounds)]
        levels = [median(values[start:end]) for start, end in itertools.pairwise(bounds)]
    points = len(levels)
    slope = median(
        [(levels[j] - levels[i]) / (steps[j] - steps[i]) for i in range(points) for j in range(i + 1, points)]
    )
    return math.exp(min(slope * (n - 1), 700.0))


@pytest.mark.parametrize("window_steps", [3, 4, 10, 20, 32, 33, 50])
def test_growth_factor_equals_a_fresh_fit_every_step(window_steps: int) -> None:
    rng = random.Random(window_steps)
    window = GrowthWindow(window_steps)
    for step in range(300):
        if step % 37 == 0:
            norm = 1e3 * rng.random()  # a spike
        elif step % 41 == 0:
            norm = 0.0  # log clamps at 1e-30
        elif step % 29 == 0:
            norm = 1.0  # repeated values: equal slopes, zero slopes
        else:
            norm = rng.lognormvariate(0.01 * step, 0.3)
        window.push(norm)
        if step % 3:  # the factor is asked for on some steps only: pushes alone keep the slopes
            assert window.growth_factor() == _reference(list(window.log_norms), window_steps)
        if step in (120, 121):
            window.clear()
        if step == 200:  # resumed from a checkpoint mid-window
            restored = GrowthWindow(window_steps)
            restored.load_state_dict(window.state_dict())
            window = restored


def test_growth_factor_with_a_non_finite_log_norm_matches_a_fresh_fit() -> None:
    window = GrowthWindow(5)
    for norm in (1.0, 2.0, math.inf, 3.0, 4.0, 5.0):
        window.push(norm)
        result, expected = window.growth_factor(), _reference(list(window.log_norms), 5)
        assert result == expected or (math.isnan(result) and math.isnan(expected))
    for norm in (1.0, 2.0, 3.0, 4.0, 5.0):  # the Inf has left the window: slopes are kept again
        window.push(norm)
        assert window.growth_factor() == _reference(list(window.log_norms), 5)


_SPECIAL = [0.0, -0.0, 1.5, -2.25, 0.1, 1e-45, 3.5e38, -3.5e38, math.inf, -math.inf, math.nan, FLOAT32_MAX, 2.0**100]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_reduction_without_collective_matches_the_staging_vector(dtype: torch.dtype) -> None:
    fields = [("a", "max"), ("b", "min"), ("c", "max"), ("d", "min"), ("e", "max_worst")]
    fast, staged = RankReduction(fields), RankReduction(fields)
    staged._read_locally = lambda values: None  # type: ignore[method-assign]
    rng = random.Random(0)
    for _ in range(200):
        values = {}
        for name, _ in fields:
            number = rng.choice([*_SPECIAL, rng.uniform(-1e6, 1e6)])
            kind = rng.choice(["float", "0-d", "1-element"])
            if kind == "float" and math.isfinite(number) and abs(number) > FLOAT32_MAX:
                kind = "0-d"  # the staging vector refuses a finite float beyond float32 (fill_ raises)
            if kind == "float":
                values[name] = number
            else:
                values[name] = torch.tensor(number if kind == "0-d" else [number], dtype=dtype)
        got, expected = fast.reduce(values, distributed=False), staged.reduce(values, distributed=False)
        assert list(got) == list(expected)
        for name in got:  # bit for bit, the sign of a zero included
            assert math.copysign(1.0, got[name]) == math.copysign(1.0, expected[name])
            assert got[name] == expected[name], (name, values[name], got[name], expected[name])


@pytest.mark.parametrize("distributed_path", [False, True])
def test_max_worst_reads_any_non_finite_value_as_the_largest(distributed_path: bool) -> None:
    """What the guard did to a loss before the reduction (NaN, +-Inf -> +Inf, then ``"max"``), in the reduction."""
    worst, plain = RankReduction([("loss", "max_worst")]), RankReduction([("loss", "max")])
    if distributed_path:  # the staging vector that a collective would carry
        worst._read_locally = lambda values: None  # type: ignore[method-assign]
    for number in [*_SPECIAL, 2.5, -2.5, -FLOAT32_MAX]:
        loss = torch.tensor(number)
        got = worst.reduce({"loss": loss}, distributed=False)["loss"]
        expected = plain.reduce({"loss": loss.nan_to_num(nan=math.inf, posinf=math.inf, neginf=math.inf)},
                                distributed=False)["loss"]
        assert got == expected, (number, got, expected)
    with pytest.raises(ValueError, match="'max_worst'"):
        RankReduction([("loss", "sum")])  # type: ignore[list-item]


def test_rank_reduction_of_floats_only_reads_nothing_from_a_device() -> None:
    reduction = RankReduction([("x", "max"), ("y", "min")])
    assert reduction.reduce({"x": math.nan, "y": math.inf}, distributed=True) == {"x": 0.0, "y": FLOAT32_MAX}
