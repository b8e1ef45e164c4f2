"""Under plain SGD, weights that doubled since the lowest loss are evidence the divergence rule weighs: a loss climb
backed by it is judged without the noise part of the margin (``WEIGHT_GROWTH_EVIDENCE`` in
``lightning_gradstab/guard/detect.py``); without a measured weight norm (Adam) nothing changes."""

from __future__ import annotations

import json
import math
import random

import pytest

from lightning_gradstab.guard.detect import LOSS_NOISE_SIGMAS, WEIGHT_GROWTH_EVIDENCE, Observation
from lightning_gradstab.guard.ladder import ExplosionPolicy
from lightning_gradstab.running import LossTrend

INITIAL_WEIGHT_NORM = 10.0
FALL_STEPS = 60


def _climb(weights_grow: bool, measured: bool = True) -> tuple[ExplosionPolicy, list[tuple[int, float, float]]]:
    """A loss that falls fast for ``FALL_STEPS`` steps (its noise measured during the fall is wide), then climbs
    slowly; the weights' norm stays put, or grows by 2.5 % a step during the climb. Returns the policy and, for
    each step of the climb, ``(step, rise of the smoothed loss, weight norm)`` up to the first divergence."""
    rng = random.Random(0)
    policy = ExplosionPolicy()
    climb = []
    for step in range(200):
        if step < FALL_STEPS:
            loss = 0.5 + 2.0 * math.exp(-step / 8) + rng.gauss(0.0, 0.15)
            weight_norm = INITIAL_WEIGHT_NORM
        else:
            loss = 0.6 + 0.012 * (step - FALL_STEPS) + rng.gauss(0.0, 0.15)
            weight_norm = INITIAL_WEIGHT_NORM * ((1.0 + (step - FALL_STEPS) / 40) if weights_grow else 1.0)
        observation = Observation(
            1.0 + 0.1 * rng.random(), loss=loss, weight_norm=weight_norm if measured else None,
            step_size=1e-3 if measured else None,
        )
        decision = policy.step(observation)
        if step >= FALL_STEPS:
            climb.append((step, policy.detector.loss_trend.rise(), weight_norm))
        if decision.anomaly == "divergence":
            break
    return policy, climb


def test_a_climb_while_the_weights_double_is_a_divergence_before_it_clears_the_noise_margin() -> None:
    policy, climb = _climb(weights_grow=True)
    _, _, weight_norm = climb[-1]
    trend = policy.detector.loss_trend
    assert trend.weight_norm_at_lowest == pytest.approx(INITIAL_WEIGHT_NORM)
    # the verdict came with the first step whose weights passed twice their norm at the lowest loss ...
    assert weight_norm > WEIGHT_GROWTH_EVIDENCE * INITIAL_WEIGHT_NORM
    assert all(norm <= WEIGHT_GROWTH_EVIDENCE * INITIAL_WEIGHT_NORM for _, _, norm in climb[:-1])
    # ... on a rise past the relative tolerance (half the lowest loss) but well inside 3 noise standard deviations
    noise_margin = LOSS_NOISE_SIGMAS * trend.noise_at_lowest
    assert policy.counts["divergence"] == 1
    _, rise_before, _ = climb[-2]
    assert 0.5 * trend.lowest < rise_before < 0.5 * noise_margin


def test_the_same_climb_with_weights_that_stay_put_needs_the_whole_noise_margin() -> None:
    _, climb_grown = _climb(weights_grow=True)
    policy, climb = _climb(weights_grow=False)
    trend = policy.detector.loss_trend
    assert climb[-1][0] > climb_grown[-1][0] + 50  # the verdict comes much later, ...
    _, rise_before, _ = climb[-2]
    # ... once the rise (with the new batch) passes 3 standard deviations of the loss measured at the lowest
    assert rise_before > 0.8 * LOSS_NOISE_SIGMAS * trend.noise_at_lowest


def test_without_a_measured_weight_norm_adam_runs_are_judged_as_before() -> None:
    sgd, _ = _climb(weights_grow=False)
    adam, climb = _climb(weights_grow=True, measured=False)  # the guard measures no weight norm under Adam
    assert adam.detector.loss_trend.weight_norm_at_lowest == 0.0
    assert not adam.detector.weights_grown()
    assert climb[-1][0] == _climb(weights_grow=False, measured=False)[1][-1][0]
    assert sgd.counts["divergence"] == adam.counts["divergence"] == 1


def test_the_weight_norm_at_the_lowest_loss_survives_a_checkpoint_and_older_states_load_without_it() -> None:
    policy, _ = _climb(weights_grow=False)
    state = json.loads(json.dumps(policy.state_dict()))
    assert state["loss_trend"]["weight_norm_at_lowest"] == pytest.approx(INITIAL_WEIGHT_NORM)
    resumed = ExplosionPolicy()
    resumed.load_state_dict(state)
    assert resumed.detector.loss_trend.weight_norm_at_lowest == policy.detector.loss_trend.weight_norm_at_lowest
    state["version"] = 10
    del state["loss_trend"]["weight_norm_at_lowest"]
    older = ExplosionPolicy()
    older.load_state_dict(state)
    assert older.detector.loss_trend.weight_norm_at_lowest == 0.0  # not measured: no evidence until a new lowest


@pytest.mark.parametrize("value", [-1.0, float("nan"), "10"])
def test_a_malformed_weight_norm_at_the_lowest_loss_is_refused_naming_the_key(value: object) -> None:
    policy, _ = _climb(weights_grow=False)
    state = policy.state_dict()
    state["loss_trend"]["weight_norm_at_lowest"] = value
    with pytest.raises(ValueError, match=r"loss_trend\.weight_norm_at_lowest"):
        ExplosionPolicy().load_state_dict(state)


def test_the_loss_trend_keeps_the_weight_norm_of_its_lowest_value_and_a_restart_takes_the_current_one() -> None:
    trend = LossTrend(horizon_steps=2)
    trend.update(2.0, weight_norm=1.0)
    trend.update(1.0, weight_norm=1.5)  # a new lowest: its weight norm is kept
    trend.update(3.0, weight_norm=4.0)  # a rise: the lowest and its weight norm stay
    assert trend.weight_norm_at_lowest == 1.5
    trend.update(0.5, healthy=False, weight_norm=5.0)  # an unhealthy step never lowers the reference
    assert trend.weight_norm_at_lowest == 1.5
    trend.restart_at(3.0, weight_norm=4.0)  # judged from the level of a verdict given without a rollback
    assert (trend.lowest, trend.weight_norm_at_lowest) == (3.0, 4.0)
