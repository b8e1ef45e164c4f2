"""Specification of the guard's pure core: running statistics, detection, the ladder and its state."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

from lightning_gradstab.guard.backoff import MIN_LR_SCALE
from lightning_gradstab.guard.config import DEFAULT_BUDGETS, RUNGS, PolicyConfig
from lightning_gradstab.guard.decision import Decision
from lightning_gradstab.guard.detect import REGIME_STEPS, Observation
from lightning_gradstab.guard.ladder import ExplosionPolicy
from lightning_gradstab.guard.policy_state import STATE_VERSION
from lightning_gradstab.guard.rollback_check import OBJECTIVE_SHIFTS_TO_TRUST, ROLLBACK_CHECK_STEPS
from lightning_gradstab.guard.snapshot_schedule import SNAPSHOT_HEALTHY_STREAK
from lightning_gradstab.running import GrowthWindow, LogNormStatistics, LossTrend, RankReduction
from tests.helpers import policy_golden


def _healthy_norms(count: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(0.0, 0.2) for _ in range(count)]


def _warmed_policy(**options: object) -> ExplosionPolicy:
    policy = ExplosionPolicy(PolicyConfig(**options))
    for norm in _healthy_norms(40):
        policy.step(Observation(norm))
    return policy


def test_log_norm_statistics_match_exact_mean_and_variance_during_warmup() -> None:
    norms = _healthy_norms(25)
    statistics = LogNormStatistics(warmup_steps=25, log_std_floor=0.0)
    for norm in norms:
        statistics.update(norm)
    logs = np.log(np.array(norms, dtype=np.float64))
    assert statistics.mean == pytest.approx(logs.mean(), rel=1e-12)
    assert statistics.std == pytest.approx(logs.std(), rel=1e-10)


def test_log_norm_statistics_follow_the_ema_recursion_after_warmup() -> None:
    statistics = LogNormStatistics(decay=0.9, warmup_steps=1, log_std_floor=0.0)
    statistics.update(1.0)
    statistics.update(math.e)  # log = 1: mean 0 -> 0.1, variance 0.9 * (0 + 0.1 * 1)
    assert statistics.mean == pytest.approx(0.1)
    assert statistics.variance == pytest.approx(0.09)


def test_zscore_is_zero_until_warmed_up() -> None:
    statistics = LogNormStatistics(warmup_steps=3)
    statistics.update(1.0)
    assert statistics.zscore(1e6) == 0.0


def test_growth_window_reports_the_fitted_growth_over_the_window() -> None:
    window = GrowthWindow(window_steps=10)
    for step in range(10):
        window.push(1.5**step)
    assert window.growth_factor() == pytest.approx(1.5**9)


def test_rank_reduction_returns_named_host_floats_with_min_and_max_fields() -> None:
    reduction = RankReduction([("norm", "max"), ("scale", "min")])
    values = reduction.reduce({"norm": torch.tensor(3.0), "scale": torch.tensor(8.0)}, distributed=False)
    assert values == {"norm": 3.0, "scale": 8.0}


def test_rank_reduction_rejects_unknown_reduce_kind() -> None:
    with pytest.raises(ValueError, match=r"'sum'.*accepted: 'max', 'min'"):
        RankReduction([("norm", "sum")])  # type: ignore[list-item]


def test_healthy_stream_stays_at_the_clip_rung() -> None:
    policy = ExplosionPolicy()
    levels = [policy.step(Observation(norm)).level for norm in _healthy_norms(3000)]
    assert max(levels) == RUNGS.index("clip")
    assert policy.counts.get("clip", 0) < 0.02 * 3000  # ZClip-like: a few percent at most


def test_spike_is_clipped_to_the_zclip_reciprocal_threshold_in_log_space() -> None:
    policy = _warmed_policy()
    mean, std = policy.statistics.mean, policy.statistics.std
    decision = policy.step(Observation(1e4))
    zscore = (math.log(1e4) - mean) / std
    expected_threshold = math.exp(mean + 2.5**2 / zscore * std)
    assert decision.anomaly == "spike"
    assert decision.zscore == pytest.approx(zscore)
    assert decision.clip_threshold == pytest.approx(expected_threshold)
    assert decision.clip_coefficient == pytest.approx(expected_threshold / 1e4)
    assert decision.actions == ["clip"]


def test_statistics_learn_the_clipped_norm_and_ignore_nonfinite_steps() -> None:
    policy = _warmed_policy()
    decision = policy.step(Observation(1e4))
    assert policy.statistics.mean < math.log(decision.clip_threshold) + 1e-9
    before = policy.statistics.state_dict()
    policy.step(Observation(math.nan, nonfinite=True))
    assert policy.statistics.state_dict() == before


def test_nonfinite_gradient_jumps_to_skip() -> None:
    policy = _warmed_policy()
    decision = policy.step(Observation(math.nan, nonfinite=True))
    assert decision.anomaly == "nonfinite"
    assert decision.rung == "skip"
    assert decision.skip and decision.actions == ["skip"]


def test_nonfinite_gradient_is_only_observed_when_the_ladder_is_capped_below_skip() -> None:
    policy = _warmed_policy(max_rung="clip")
    decision = policy.step(Observation(math.nan, nonfinite=True))
    assert decision.anomaly == "nonfinite" and not decision.skip and decision.level == 1


def test_sustained_growth_hidden_in_noise_is_detected_as_growth() -> None:
    rng = random.Random(0)
    policy = ExplosionPolicy()
    for _ in range(40):
        policy.step(Observation(math.exp(rng.gauss(0.0, 0.5))))
    trend = [math.exp(0.15 * step + rng.gauss(0.0, 0.5)) for step in range(1, 25)]
    anomalies = [policy.step(Observation(norm)).anomaly for norm in trend]
    assert "growth" in anomalies


def _slow_climb(flat_steps: int, climb_steps: int, rate_per_step: float, seed: int = 0) -> list[float]:
    """Log-normal noise around 1, then a steady climb: a 10x rise every ``log(10) / rate_per_step`` steps."""
    rng = random.Random(seed)
    steps = range(flat_steps + climb_steps)
    return [math.exp(rate_per_step * max(0, t - flat_steps) + rng.gauss(0.0, 0.3)) for t in steps]


def test_slow_sustained_growth_is_caught_as_drift_and_the_clip_threshold_stops_following_it() -> None:
    flat_steps, rate = 200, 0.02  # 1.5x per 20-step window: invisible to the growth window's 10x test
    policy = ExplosionPolicy(PolicyConfig(max_rung="tight_clip"))
    decisions = [policy.step(Observation(norm)) for norm in _slow_climb(flat_steps, 400, rate)]
    assert {d.anomaly for d in decisions[:flat_steps]} <= {None, "spike"}
    first = next(d for d in decisions if d.anomaly == "drift")
    assert first.step - flat_steps < 250  # caught before the norm rose exp(0.02 * 250) = 150x
    after = decisions[first.step :]
    assert all(d.anomaly == "drift" for d in after[-100:])  # the reference does not follow the climb
    assert max(d.clip_threshold for d in after) <= first.clip_threshold  # no ratchet while the norm rises 58x more
    assert after[-1].clip_threshold == pytest.approx(policy.reference_norm) and policy.reference_norm < 5.0
    assert {"growth"} & {d.anomaly for d in decisions} == set()


def test_drift_alone_clips_tightly_but_never_skips_backs_off_or_rolls_back() -> None:
    policy = ExplosionPolicy()
    decisions = [policy.step(Observation(norm)) for norm in _slow_climb(200, 300, 0.02)]
    assert max(d.level for d in decisions) == RUNGS.index("tight_clip")  # gradient evidence clips, no more
    assert not any(d.skip or d.rollback or d.stop for d in decisions) and policy.state.lr_scale == 1.0
    anomalies = [d.anomaly for d in decisions]
    assert anomalies.count("drift") > anomalies.count("spike") + anomalies.count("growth")
    assert decisions[-1].clip_coefficient < 0.1  # the climb is held at the healthy scale


def test_a_norm_climb_is_acted_on_above_clipping_only_once_the_loss_rises() -> None:
    policy = ExplosionPolicy()
    rng = random.Random(0)
    climb = _slow_climb(200, 400, 0.02)
    held = [1.6 * math.exp(rng.gauss(0.0, 0.02)) for _ in range(400)]
    losses = held + [1.6 * math.exp(0.02 * t) for t in range(200)]
    decisions = []
    for norm, loss in zip(climb, losses, strict=True):
        decisions.append(policy.step(Observation(norm, loss=loss)))
        if decisions[-1].anomaly == "divergence":
            break
    first_divergence = decisions[-1]
    assert first_divergence.step > 400  # while the loss held, the 50x norm climb was a new scale, not damage
    assert not any(d.skip or d.rollback or d.lr_scale != 1.0 for d in decisions[:-1])
    assert first_divergence.rollback and policy.state.lr_scale == pytest.approx(0.5)


def test_a_new_gradient_scale_moves_the_statistics_and_keeps_their_spread() -> None:
    rng = random.Random(0)
    policy = ExplosionPolicy()
    losses = iter(2.3 - 0.002 * t for t in range(1000))  # falling: the norm's climb does no visible harm
    for _ in range(40):
        policy.step(Observation(0.1 * math.exp(rng.gauss(0.0, 0.2)), loss=next(losses)))
    spread = policy.statistics.std
    climb = [0.1 * 20.0 ** (t / 15) for t in range(1, 31)]  # leaving a plateau: the norm rises 20x in 15 steps
    seen = []
    for norm in climb:
        policy.step(Observation(norm, loss=next(losses)))
        seen.append(norm)
        if policy.counts.get("regime_change"):
            break
    # the level is the last REGIME_STEPS norms' (geometric mean); the spread is the one learned (from clipped
    # norms) before, not the climb's own, which measures the climb
    logs = [math.log(n) for n in seen[-REGIME_STEPS:]]
    assert policy.statistics.mean == pytest.approx(sum(logs) / REGIME_STEPS)
    assert policy.statistics.std < min(1.25 * spread, 0.5 * float(np.std(logs)))
    level = policy.statistics.mean
    assert policy.statistics.warmed_up  # no second warm-up, whose only bound is growth_factor x the typical norm
    spike = policy.step(Observation(8.0 * math.exp(level), loss=next(losses)))
    assert spike.anomaly == "spike" and spike.clip_threshold < 2.0 * math.exp(level)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_early_training_that_rises_10x_in_50_steps_then_settles_is_not_drift(seed: int) -> None:
    rng = random.Random(seed)
    ramp = [math.log(10.0) * min(t, 50) / 50 for t in range(3000)]  # warm-up: leaving the init regime
    policy = ExplosionPolicy()
    decisions = [policy.step(Observation(math.exp(level + rng.gauss(0.0, 0.3)))) for level in ramp]
    assert "drift" not in {d.anomaly for d in decisions}
    assert max(d.level for d in decisions) == RUNGS.index("clip")


def test_drift_detection_is_off_without_a_horizon() -> None:
    policy = ExplosionPolicy(PolicyConfig(max_rung="tight_clip", drift_horizon_steps=None))
    anomalies = {policy.step(Observation(norm)).anomaly for norm in _slow_climb(200, 400, 0.02)}
    assert "drift" not in anomalies and policy.reference_norm == math.inf


def test_repeated_gradient_spikes_stop_climbing_at_tight_clip() -> None:
    budgets = {"clip": 1, "tight_clip": 1, "skip": 1, "lr_backoff": 1, "rollback": 1}
    policy = _warmed_policy(budgets=budgets)
    decisions = [policy.step(Observation(1e6)) for _ in range(8)]
    assert [d.rung for d in decisions[:3]] == ["clip", "tight_clip", "tight_clip"]
    assert {d.rung for d in decisions[3:]} == {"tight_clip"}
    assert all(d.actions == ["clip"] for d in decisions) and policy.state.lr_scale == 1.0


def test_repeated_non_finite_steps_climb_every_rung_in_order_and_then_stop() -> None:
    budgets = {"skip": 1, "lr_backoff": 1, "rollback": 1}
    policy = _warmed_policy(budgets=budgets)
    decisions = [policy.step(Observation(math.nan, nonfinite=True)) for _ in range(4)]
    assert [d.rung for d in decisions] == ["skip", "lr_backoff", "rollback", "stop"]
    assert all(d.skip for d in decisions) and policy.state.lr_scale == pytest.approx(0.5)
    assert decisions[2].rollback and decisions[3].stop


def test_repeated_loss_spikes_skip_their_batches_and_never_back_off_or_roll_back() -> None:
    policy = ExplosionPolicy()
    rng = random.Random(0)
    decisions = []
    for _ in range(2000):  # 2.7 % of batches corrupted (loss x 1e4), the rest ordinary
        loss = 0.3 * math.exp(rng.gauss(0.0, 0.2)) * (1e4 if rng.random() < 0.027 else 1.0)
        decisions.append(policy.step(Observation(1.0 + 0.1 * rng.random(), loss=loss)))
    spikes = [d for d in decisions if d.anomaly == "loss_spike"]
    assert spikes and all(d.skip for d in spikes)
    assert max(d.level for d in decisions) <= RUNGS.index("skip") and policy.state.lr_scale == 1.0
    assert not any(d.rollback or d.stop for d in decisions)


def test_lr_backoff_has_a_floor_that_stops_the_run_with_its_reason() -> None:
    policy = _warmed_policy(budgets={"skip": 1, "lr_backoff": 100}, max_rung="stop")
    scales, decisions = [], []
    for _ in range(30):
        decisions.append(policy.step(Observation(math.nan, nonfinite=True)))
        scales.append(policy.state.lr_scale)
    stop = next(d for d in decisions if d.stop)
    # after 40 healthy steps: a skip, 10 halvings to the floor, and the 11th would pass it
    assert stop.rung == "lr_backoff" and stop.step == 40 + 12
    assert min(scales) == pytest.approx(MIN_LR_SCALE)  # never below the floor


def test_tight_clip_clips_every_step_to_the_typical_norm() -> None:
    policy = _warmed_policy(budgets={"clip": 1}, tight_clip_ratio=0.5)
    policy.step(Observation(1e6))
    policy.step(Observation(1e6))
    assert policy.level == RUNGS.index("tight_clip")
    typical = policy.statistics.typical_norm
    decision = policy.step(Observation(typical))
    assert decision.anomaly is None
    assert decision.clip_threshold == pytest.approx(0.5 * typical)
    assert decision.clip_coefficient == pytest.approx(0.5)


def test_level_drops_one_rung_after_the_healthy_streak() -> None:
    policy = _warmed_policy(budgets={"clip": 1}, healthy_steps_to_deescalate=10)
    policy.step(Observation(1e6))
    policy.step(Observation(1e6))
    assert policy.level == RUNGS.index("tight_clip")
    typical = policy.statistics.typical_norm
    levels = [policy.step(Observation(typical)).level for _ in range(10)]
    assert levels[:9] == [2] * 9 and levels[9] == 1


def test_learning_rate_scale_recovers_gradually_up_to_below_the_scale_that_failed() -> None:
    policy = _warmed_policy(backoff_factor=0.5, lr_recovery_steps=10, budgets={"skip": 1})
    for _ in range(3):  # the 2nd non-finite step starts a back-off episode at scale 1, the 3rd backs off again
        policy.step(Observation(math.nan, nonfinite=True))
    assert policy.state.lr_scale == pytest.approx(0.25)
    scales = [policy.step(Observation(policy.statistics.typical_norm)).lr_scale for _ in range(30)]
    assert scales[0] == pytest.approx(0.25 * 2 ** (1 / 10))
    assert scales == sorted(scales)
    assert scales[9] == pytest.approx(0.5) and scales[-1] == pytest.approx(0.5)  # ceiling: 0.5 x the failed 1.0


def _healthy_steps_until_the_ceiling_rises(policy: ExplosionPolicy, limit: int = 2000) -> int:
    ceiling = policy.state.lr_ceiling
    for count in range(1, limit + 1):
        policy.step(Observation(policy.statistics.typical_norm))
        if policy.state.lr_ceiling > ceiling:
            return count
    return limit + 1


def _back_off_episode(policy: ExplosionPolicy) -> None:
    for _ in range(3):  # the 2nd non-finite step starts a back-off episode, the 3rd backs off again
        policy.step(Observation(math.nan, nonfinite=True))


def test_a_ceiling_that_held_a_long_horizon_without_failing_again_is_raised_one_factor_at_a_time() -> None:
    """A failed rate is evidence about the run as it was then: after ``drift_horizon_steps`` steps without another
    failure it is tried again (one factor), and the scale recovers to the configured rate."""
    policy = _warmed_policy(backoff_factor=0.5, lr_recovery_steps=10, budgets={"skip": 1}, drift_horizon_steps=200)
    _back_off_episode(policy)
    lowered_at = policy.state.lr_ceiling_lowered_step
    assert policy.state.lr_ceiling == pytest.approx(0.5) and policy.state.lr_ceiling_hold == 200
    _healthy_steps_until_the_ceiling_rises(policy)
    assert policy.state.steps - lowered_at == 200
    assert policy.state.lr_ceiling == 1.0 and policy.counts["lr_ceiling_raised"] == 1
    scales = [policy.step(Observation(policy.statistics.typical_norm)).lr_scale for _ in range(15)]
    assert scales[-1] == 1.0  # 0.5 -> 1 in lr_recovery_steps healthy steps


def test_a_rate_that_fails_again_within_its_stretch_is_held_twice_as_long() -> None:
    """Exponential back-off in time: a rate that keeps failing is re-tried at most log2(steps / horizon) times."""
    policy = _warmed_policy(backoff_factor=0.5, lr_recovery_steps=10, budgets={"skip": 1}, drift_horizon_steps=200)
    _back_off_episode(policy)
    _healthy_steps_until_the_ceiling_rises(policy)
    for _ in range(60):  # the level steps down one rung a healthy stretch, to where a new episode begins
        policy.step(Observation(policy.statistics.typical_norm))
    _back_off_episode(policy)  # the raised rate fails 60 steps into its 200-step stretch
    assert policy.state.lr_ceiling == pytest.approx(0.5) and policy.state.lr_ceiling_hold == 400
    lowered_at = policy.state.lr_ceiling_lowered_step
    _healthy_steps_until_the_ceiling_rises(policy)
    assert policy.state.steps - lowered_at == 400


def test_a_state_saved_before_ceilings_held_a_stretch_starts_the_stretch_when_it_resumes() -> None:
    policy = _warmed_policy(backoff_factor=0.5, lr_recovery_steps=10, budgets={"skip": 1}, drift_horizon_steps=200)
    _back_off_episode(policy)
    state = policy.state_dict()
    state["version"] = 6
    for name in ("lr_ceiling_hold", "lr_ceiling_lowered_step", "lr_ceiling_raised_step"):
        del state["counters"][name]
    restored = ExplosionPolicy(PolicyConfig(backoff_factor=0.5, lr_recovery_steps=10, drift_horizon_steps=200))
    restored.load_state_dict(state)
    resumed_at = restored.state.steps
    _healthy_steps_until_the_ceiling_rises(restored)
    assert restored.state.steps - resumed_at == 201  # the first healthy step starts the 200-step stretch


def test_competing_losses_clip_only_steps_growth_factor_above_the_typical_norm() -> None:
    """A GAN player's gradient scale follows the other player: a z-score spike is no evidence there (the step is
    left as it is), a step 10x (``growth_factor``) above the typical norm still is."""
    single, game = _warmed_policy(), ExplosionPolicy(PolicyConfig())
    for norm in _healthy_norms(40):
        game.step(Observation(norm, competing=True))
    typical = game.statistics.typical_norm
    assert single.step(Observation(5.0 * typical)).clip_coefficient < 1.0
    five = game.step(Observation(5.0 * typical, competing=True))
    assert five.anomaly == "spike" and five.clip_coefficient == 1.0
    bound = 10.0 * game.statistics.typical_norm
    twenty = game.step(Observation(20.0 * typical, competing=True))
    assert twenty.clip_coefficient * 20.0 * typical == pytest.approx(bound)


def test_amp_overflow_is_counted_but_never_escalates() -> None:
    policy = _warmed_policy()
    decisions = [policy.step(Observation(math.inf, nonfinite=True, loss_scale=2.0**15)) for _ in range(20)]
    assert {d.anomaly for d in decisions} == {"amp_overflow"}
    assert not any(d.skip for d in decisions) and policy.level == 1
    assert policy.counts["amp_overflow"] == 20


def test_collapsed_loss_scale_is_an_explosion() -> None:
    policy = _warmed_policy()
    decision = policy.step(Observation(1.0, loss_scale=0.25))
    assert decision.anomaly == "loss_scale_collapse" and decision.skip


def test_snapshots_are_refreshed_every_snapshot_every_healthy_steps_once_ten_in_a_row_were_healthy() -> None:
    policy = ExplosionPolicy(PolicyConfig(snapshot_every=5))
    steps = [d.step for d in (policy.step(Observation(n)) for n in _healthy_norms(21)) if d.snapshot]
    assert steps == [1, 10, 16]  # the first healthy step, then the 10-step streak, then every 5 healthy steps
    assert not ExplosionPolicy(PolicyConfig(max_rung="skip")).step(Observation(1.0)).snapshot


def test_snapshots_are_refreshed_while_escalated_once_the_run_is_healthy_again() -> None:
    """A long healthy stretch above the resting rung must not leave the step-1 snapshot as the only one."""
    policy = _warmed_policy(budgets={"clip": 1}, healthy_steps_to_deescalate=1000)
    policy.step(Observation(1e6))
    policy.step(Observation(1e6))
    assert policy.level == RUNGS.index("tight_clip")
    snapshots = [d.step for d in (policy.step(Observation(n)) for n in _healthy_norms(300, seed=4)) if d.snapshot]
    assert snapshots and policy.level == RUNGS.index("tight_clip")  # refreshed without de-escalating
    assert policy.state.snapshot_step == snapshots[-1] > 300


def test_state_dict_round_trip_reproduces_every_future_decision() -> None:
    original = _warmed_policy(budgets={"clip": 1})
    original.step(Observation(1e6))
    restored = ExplosionPolicy(PolicyConfig(budgets={"clip": 1}))
    restored.load_state_dict(original.state_dict())
    assert restored.state_dict() == original.state_dict()
    stream = [*_healthy_norms(30, seed=3), 1e5, math.nan]
    for norm in stream:
        observation = Observation(norm, nonfinite=not math.isfinite(norm))
        assert restored.step(observation) == original.step(observation)


def test_state_dict_of_another_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        ExplosionPolicy().load_state_dict({"version": 99})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"zscore_threshold": 0.0}, "`zscore_threshold` must be a number > 0, got 0.0"),
        ({"zscore_threshold": -1.0}, "`zscore_threshold` must be a number > 0"),
        ({"warmup_steps": 0}, "`warmup_steps` must be an int >= 1, got 0"),
        ({"max_rung": "explode"}, "`max_rung` must be one of \\['observe', 'clip'"),
        ({"budgets": {"panic": 1}}, "`budgets` key must be one of .*got 'panic'"),
        ({"backoff_factor": 1.0}, "`backoff_factor` must be a number in \\(0, 1\\), got 1.0"),
        ({"backoff_factor": 0.0}, "`backoff_factor` must be a number in \\(0, 1\\)"),
        ({"ema_decay": 1.0}, "`ema_decay` must be a number in \\(0, 1\\)"),
        ({"growth_factor": 1.0}, "`growth_factor` must be a number > 1"),
        ({"drift_horizon_steps": 20}, "`drift_horizon_steps` must be None or an int above .* = 33.3, got 20"),
        ({"max_rung": "clip", "backoff_factor": 0.5}, "`backoff_factor` configures rung 'lr_backoff'.*max_rung"),
        ({"max_rung": "skip", "budgets": {"rollback": 2}}, "`budgets` sets rung 'rollback'.*above `max_rung`"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyConfig(**options)


def test_non_integer_step_counts_raise_type_error() -> None:
    with pytest.raises(TypeError, match=r"`warmup_steps` must be an int >= 1, got float 2\.5"):
        PolicyConfig(warmup_steps=2.5)  # type: ignore[arg-type]


def test_event_log_keeps_the_newest_events_and_reports_those_not_yet_written() -> None:
    policy = ExplosionPolicy(PolicyConfig(max_rung="observe"), max_events=3)
    for _ in range(5):
        policy.step(Observation(math.nan, nonfinite=True))
    assert [e["step"] for e in policy.events] == [3, 4, 5]
    assert [e["step"] for e in policy.events_since(4)] == [5]
    assert [e["step"] for e in policy.events_since(0)] == [3, 4, 5]  # older ones were dropped
    assert policy.events_since(5) == []


def test_rank_reduction_makes_nonfinite_values_safe_for_max() -> None:
    reduction = RankReduction([("norm", "max"), ("count", "max")])
    values = reduction.reduce({"norm": torch.tensor(math.nan), "count": torch.tensor(math.inf)}, distributed=False)
    assert values == {"norm": 0.0, "count": float(torch.finfo(torch.float32).max)}


@pytest.mark.parametrize(
    "options", [{"zscore_threshold": "2.5"}, {"backoff_factor": True}, {"budgets": 3}, {"drift_horizon_steps": 1e3}]
)
def test_wrong_types_raise_type_error_naming_the_argument(options: dict) -> None:
    (argument,) = options
    with pytest.raises(TypeError, match=f"`{argument}` must be"):
        PolicyConfig(**options)


def test_sparse_spikes_of_a_long_healthy_run_never_use_up_the_clip_budget():
    # 3 % of 5000 steps are 8x spikes (a momentum-SGD run's bumps): each one is clipped, none adds up to an
    # escalation, because every healthy step drains the budget. Counted over the run's lifetime instead, the
    # same stream climbed to `stop`.
    rng = random.Random(0)
    policy = ExplosionPolicy()
    levels = []
    for _ in range(5000):
        norm = math.exp(rng.gauss(0.0, 0.2)) * (8.0 if rng.random() < 0.03 else 1.0)
        levels.append(policy.step(Observation(total_norm=norm, nonfinite=False)).level)
    assert max(levels) == 1
    assert policy.counts["clip"] > 100 and "escalate" not in policy.counts


def test_a_burst_of_spikes_still_escalates_past_the_clip_rung():
    policy = ExplosionPolicy()
    for _ in range(100):
        policy.step(Observation(total_norm=1.0, nonfinite=False))
    for _ in range(10):  # more than the clip budget (8) within a few steps
        policy.step(Observation(total_norm=1e3, nonfinite=False))
        policy.step(Observation(total_norm=1.0, nonfinite=False))
    assert policy.level >= 2


def _losses(count: int, start: float = 2.3, seed: int = 0) -> list[float]:
    """A falling, noisy training loss (2 % per-batch noise)."""
    rng = random.Random(seed)
    return [start * (0.5 + 0.5 * math.exp(-step / 100)) * (1 + 0.02 * rng.gauss(0.0, 1.0)) for step in range(count)]


def _warmed_with_loss(**options: object) -> ExplosionPolicy:
    policy = ExplosionPolicy(PolicyConfig(**options))
    for norm, loss in zip(_healthy_norms(60), _losses(60), strict=True):
        policy.step(Observation(norm, loss=loss))
    return policy


def test_a_loss_spike_is_skipped_before_it_lands_even_when_the_gradient_norm_looks_normal() -> None:
    policy = _warmed_with_loss()
    decision = policy.step(Observation(1.0, loss=6.0))  # a corrupted batch: normal norm, 3x the loss
    assert decision.anomaly == "loss_spike" and decision.evidence == "loss"
    assert decision.skip and decision.actions == ["skip"] and decision.level == RUNGS.index("clip")
    before = policy.loss_statistics.state_dict()
    assert policy.step(Observation(1.0, loss=6.5)).skip  # another corrupted batch
    assert policy.loss_statistics.state_dict() == before  # a skipped batch's loss is not learned


def test_a_skipped_batch_that_comes_back_unchanged_is_learned_not_skipped_again() -> None:
    # full-batch training or overfit_batches: a skip leaves the weights as they were, so the same batch gives the
    # same loss again; skipping it again would only repeat the skip until the skip bound
    policy = _warmed_with_loss()
    first = policy.step(Observation(1.0, loss=6.0))
    assert first.anomaly == "loss_spike" and first.skip
    before = policy.loss_statistics.count
    again = policy.step(Observation(1.0, loss=6.0 * (1 + 1e-7)))  # a non-deterministic reduction's last bits
    assert again.anomaly is None and not again.skip
    assert policy.loss_statistics.count == before + 1  # learned, whole
    assert policy.state.counts["repeated_batch"] == 1 and policy.state.counts["skip"] == 1
    # after a step that was not skipped the weights have moved: an outlier is judged anew
    assert policy.step(Observation(1.0, loss=600.0)).skip


def test_a_different_outlier_right_after_a_skipped_one_is_skipped_too() -> None:
    policy = _warmed_with_loss()
    assert policy.step(Observation(1.0, loss=6.0)).skip
    assert policy.step(Observation(1.0, loss=6.01)).anomaly == "loss_spike"  # another batch, not the same one
    assert "repeated_batch" not in policy.state.counts


def test_the_loss_of_a_skipped_spike_survives_a_state_dict_round_trip() -> None:
    policy = _warmed_with_loss()
    policy.step(Observation(1.0, loss=6.0))
    resumed = ExplosionPolicy()
    resumed.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert not resumed.step(Observation(1.0, loss=6.0)).skip


def test_a_state_saved_before_repeated_batches_were_recognised_resumes_judging_the_next_batch_anew() -> None:
    policy = _warmed_with_loss()
    policy.step(Observation(1.0, loss=6.0))
    state = json.loads(json.dumps(policy.state_dict()))
    state["version"] = 7
    del state["counters"]["skipped_spike_loss"]
    resumed = ExplosionPolicy()
    resumed.load_state_dict(state)
    assert resumed.state.skipped_spike_loss is None
    assert resumed.step(Observation(1.0, loss=6.0)).skip  # nothing says it was skipped: judged as before


def test_the_smoothed_loss_without_its_heaviest_batch_is_the_ema_recomputed_without_that_batch() -> None:
    rng = random.Random(3)
    losses = [rng.lognormvariate(0.0, 1.0) for _ in range(40)]
    trend = LossTrend(10)
    for loss in losses[:-1]:
        trend.update(loss)
    decay = trend.decay
    weights = [(1 - decay) * decay ** (len(losses) - 1 - i) for i in range(len(losses))]
    recent = range(len(losses) - len(trend.recent) - 1, len(losses))  # the batches kept, and the new one
    heaviest = max(recent, key=lambda i: weights[i] * losses[i])
    kept = [i for i in range(len(losses)) if i != heaviest]
    expected = sum(weights[i] * losses[i] for i in kept) / sum(weights[i] for i in kept)
    assert trend.smoothed_without_heaviest_with(losses[-1]) == pytest.approx(expected, rel=1e-12)
    assert trend.smoothed_with(losses[-1]) == pytest.approx(
        sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights), rel=1e-12
    )


def test_one_heavy_batch_of_a_fine_tune_near_a_zero_loss_is_no_divergence_but_a_rise_of_many_batches_is() -> None:
    rng = random.Random(0)
    policy = ExplosionPolicy()
    for _ in range(12):  # a trained model's first batches of a fine-tune, near a zero loss; the spread not yet known
        policy.step(Observation(math.exp(rng.gauss(0.0, 0.2)), loss=0.003 * rng.uniform(0.5, 2.0)))
    # one batch 8x the typical (under growth_factor: no loss spike) lifts the smoothed loss 1.7x, past the tolerance
    assert policy.detector.loss_trend.smoothed_with(0.024) > 1.5 * policy.detector.loss_trend.lowest
    one = policy.step(Observation(1.0, loss=0.024))
    assert one.anomaly is None and not one.rollback
    verdicts = []
    for _ in range(30):  # every batch 5x the typical now: the level rises
        verdicts.append(policy.step(Observation(1.0, loss=0.015 * rng.uniform(0.8, 1.2))).anomaly)
    assert "divergence" in verdicts


def test_the_median_of_the_last_horizon_is_the_level_that_at_least_half_of_its_batches_share() -> None:
    trend = LossTrend(horizon_steps=10)
    for loss in [5.0] * 20 + [1.0, 2.0, 3.0, 4.0, 100.0, 6.0, 7.0, 8.0, 9.0]:
        trend.update(loss)
    # the last 9 losses and the new one: 1..9 with 100 in place of 5, and 10
    assert trend.median_with(10.0) == pytest.approx(6.5)  # (6 + 7) / 2: the 100 counts as one high batch
    assert trend.median_with(0.0) == pytest.approx(5.0)  # (4 + 6) / 2
    trend.restart_at(3.0)
    assert trend.median_with(5.0) == pytest.approx(4.0)  # after a restart, the losses since


def _student_t2(rng: random.Random) -> float:
    """Student's t with 2 degrees of freedom (infinite variance), by inverting its CDF."""
    u = min(max(rng.random(), 1e-9), 1 - 1e-9)
    return (2 * u - 1) / math.sqrt(2 * u * (1 - u))


def test_heavy_tailed_batches_that_lift_the_mean_even_one_left_out_are_no_divergence_while_a_level_rise_is() -> None:
    rng = random.Random(0)
    policy = ExplosionPolicy()
    for _ in range(200):  # a fitted regression's batch losses: a floor of 0.3 and squared Student-t noise
        policy.step(Observation(1.0, loss=0.3 + 0.05 * sum(_student_t2(rng) ** 2 for _ in range(4)) / 4))
    trend = policy.detector.loss_trend
    margin = policy.detector.rise_margin()
    # three batches ~40x the typical within one horizon (15, 12, 14): the mean rises past the margin with the
    # heaviest left out,
    # but most batches of the horizon stay where they were
    heavy = [0.35] * 3 + [15.0, 0.35, 0.35, 12.0, 0.35]
    for loss in heavy:
        policy.detector.loss_trend.update(loss)
    assert trend.smoothed_with(14.0) - trend.lowest > margin
    assert trend.smoothed_without_heaviest_with(14.0) - trend.lowest > margin
    assert trend.median_with(14.0) - trend.lowest <= 0.5 * margin  # the level has not moved
    assert not policy.detector._diverging(14.0)
    for _ in range(10):  # every batch of a horizon well above the margin: the level moved
        policy.detector.loss_trend.update(0.35 + 3 * margin)
    assert policy.detector._diverging(0.35 + 3 * margin)


def test_heavy_batches_on_top_of_a_level_that_rose_half_the_margin_are_a_divergence() -> None:
    """How a plain net at too high an SGD rate diverges: the level climbs, inside the margin, and heavy batches
    come on top of it. The level must have risen by half the margin (the loss rising), the mean past all of it."""
    rng = random.Random(1)
    policy = ExplosionPolicy()
    for _ in range(200):
        policy.step(Observation(1.0, loss=1.0 + 0.05 * rng.gauss(0.0, 1.0)))
    detector, trend = policy.detector, policy.detector.loss_trend
    margin, lowest = detector.rise_margin(), trend.lowest
    level, heavy = lowest + 0.9 * margin, lowest + 5 * margin
    for loss in [level] * 3 + [heavy] + [level] * 2 + [heavy] + [level] * 2:
        trend.update(loss)
    assert 0.5 * margin < trend.median_with(heavy) - lowest < margin  # the level rose, not past the margin
    assert trend.smoothed_without_heaviest_with(heavy) - lowest > margin
    assert detector._diverging(heavy)
    quiet = ExplosionPolicy()
    for _ in range(200):
        quiet.step(Observation(1.0, loss=1.0 + 0.05 * rng.gauss(0.0, 1.0)))
    trend, margin, lowest = quiet.detector.loss_trend, quiet.detector.rise_margin(), quiet.detector.loss_trend.lowest
    level, heavy = lowest + 0.3 * margin, lowest + 7 * margin
    for loss in [level] * 3 + [heavy] + [level] * 2 + [heavy] + [level] * 2:
        trend.update(loss)
    assert trend.median_with(heavy) - lowest < 0.5 * margin
    assert trend.smoothed_without_heaviest_with(heavy) - lowest > margin  # past the margin, on a level that stayed
    assert not quiet.detector._diverging(heavy)


def test_the_recent_losses_survive_a_checkpoint_and_a_state_of_version_8_resumes_without_them() -> None:
    policy = _warmed_with_loss()
    state = json.loads(json.dumps(policy.state_dict()))
    assert len(state["loss_trend"]["recent"]) == policy.detector.loss_trend.recent.maxlen
    resumed = ExplosionPolicy()
    resumed.load_state_dict(state)
    assert list(resumed.detector.loss_trend.recent) == list(policy.detector.loss_trend.recent)
    state["version"] = 8
    del state["loss_trend"]["recent"]
    older = ExplosionPolicy()
    older.load_state_dict(state)
    assert not older.detector.loss_trend.recent
    trend = older.detector.loss_trend  # only the new batch can be left out: the smoothed loss as it was
    assert trend.smoothed_without_heaviest_with(2 * trend.smoothed) == pytest.approx(trend.smoothed, rel=1e-12)
    for version in (9, STATE_VERSION):  # the versions that keep them must hold them
        state["version"] = version
        with pytest.raises(ValueError, match=r"loss_trend\.recent"):
            ExplosionPolicy().load_state_dict(state)


def test_a_smoothed_loss_rising_far_above_its_lowest_value_is_divergence_that_rolls_back_and_halves_the_lr() -> None:
    policy = _warmed_with_loss()
    loss, decisions = 1.5, []
    while not decisions or decisions[-1].anomaly != "divergence":
        loss *= 1.15  # the loss climbs 15 % per step: below the 6-sigma loss-spike bar every single step
        decisions.append(policy.step(Observation(1.0, loss=loss)))
        assert len(decisions) < 20
    divergence = decisions[-1]
    assert divergence.rollback and divergence.skip and divergence.evidence == "loss"
    assert divergence.rung == "lr_backoff" and policy.state.lr_scale == pytest.approx(0.5)
    assert policy.state.lr_ceiling == pytest.approx(0.5)  # the scale that diverged is held off for a stretch
    assert policy.loss_trend.smoothed == policy._snapshot_loss()  # the trend is the snapshot's again
    assert policy.loss_trend.rise() < 0.5 * policy._rise_margin()  # taken near the lowest, before the climb


class _LossOfTheWeights:
    """A run whose loss belongs to its weights, as the guard's adapter carries decisions out: an update multiplies
    it by ``growth`` (times ``objective``, the data's difficulty, which no rollback changes); a skip leaves it; a
    rollback returns to the snapshot's weights; an undone rollback check to the weights kept aside."""

    def __init__(self, growth: float, loss: float = 1.0) -> None:
        self.growth, self.weights_loss, self.objective = growth, loss, 1.0
        self.snapshot = self.aside = loss

    def step(self, policy: ExplosionPolicy, norm: float = 1.0) -> Decision:
        decision = policy.step(Observation(norm, loss=self.weights_loss * self.objective))
        if decision.snapshot:  # the state before this step
            self.snapshot = self.weights_loss
        if decision.rollback_check == "start":
            self.aside = self.weights_loss
        if decision.rollback:
            self.weights_loss = self.snapshot
        elif decision.rollback_check == "undo":
            self.weights_loss = self.aside
        elif not decision.skip:
            self.weights_loss *= self.growth
        return decision


def _fitted_to_zero(policy: ExplosionPolicy, steps: int = 300, at_rest: int = 500) -> None:
    """A full-batch regression fitted to interpolation: the loss falls from 1 to 1e-15 without noise, then rests
    there, varying by 10 % (its running statistics forget the fall: the spread is the rest's)."""
    for step in range(steps):
        policy.step(Observation(1.0, loss=10.0 ** (-15 * step / (steps - 1))))
    rng = random.Random(0)
    for _ in range(at_rest):
        policy.step(Observation(1.0, loss=1e-15 * (1 + 0.1 * rng.uniform(-1.0, 1.0))))


@pytest.mark.parametrize("excursion", [4e-3, 8e-3])
def test_an_excursion_near_an_exact_fit_that_gives_back_under_1_percent_of_the_progress_is_not_divergence(
    excursion: float,
) -> None:
    policy = ExplosionPolicy()
    _fitted_to_zero(policy)
    decisions = [policy.step(Observation(1.0, loss=excursion)) for _ in range(25)]
    decisions += [policy.step(Observation(1.0, loss=1e-15)) for _ in range(10)]
    assert all(d.anomaly != "divergence" and not d.rollback for d in decisions)
    assert policy.state.lr_scale == 1.0 and policy.state.first_loss == 1.0


def test_a_rise_near_an_exact_fit_that_gives_back_a_few_percent_of_the_progress_is_divergence() -> None:
    policy, run = ExplosionPolicy(), _LossOfTheWeights(growth=0.9)
    for _ in range(330):  # from 1 to 1e-15
        run.step(policy)
    run.weights_loss, run.growth = 0.05, 1.0  # damage: the weights give back 5 % of the progress, and stay there
    decisions = [run.step(policy) for _ in range(20)]
    assert any(d.anomaly == "divergence" and d.rollback for d in decisions)
    assert policy.last_rollback_check is not None and policy.last_rollback_check["verdict"] == "weights"
    assert policy.state.lr_scale < 1.0 and run.weights_loss < 1e-12


def test_a_state_written_before_the_first_loss_was_kept_resumes_and_learns_it_afresh() -> None:
    original = _warmed_with_loss()
    state = original.state_dict()
    del state["counters"]["first_loss"]
    state["version"] = 5
    restored = ExplosionPolicy()
    restored.load_state_dict(state)
    assert restored.state.first_loss is None
    restored.step(Observation(1.0, loss=1.7))
    assert restored.state.first_loss == 1.7


def test_divergence_that_persists_below_a_thousandth_of_the_lr_stops_the_run() -> None:
    policy, run = ExplosionPolicy(), _LossOfTheWeights(growth=2.0)
    for _ in range(1000):
        decision = run.step(policy)
        if decision.stop:
            break
    assert decision.stop and decision.anomaly == "divergence"
    assert policy.counts["divergence"] == 11 and policy.state.lr_scale < 2.0**-10
    assert "objective_shift" not in policy.counts  # every check found the snapshot's loss back where it was


def test_a_rollback_stands_when_the_snapshot_scores_new_batches_as_low_as_it_did() -> None:
    policy, run = ExplosionPolicy(), _LossOfTheWeights(growth=0.999)
    for _ in range(60):
        run.step(policy)
    run.growth = 1.15  # the step size became too large: the loss of the weights climbs
    decisions = [run.step(policy)]
    while decisions[-1].rollback_check not in ("keep", "undo"):
        decisions.append(run.step(policy))
        assert len(decisions) < 40
    start = next(i for i, d in enumerate(decisions) if d.rollback_check == "start")
    checked = decisions[start + 1 :]
    assert decisions[start].rollback and decisions[start].anomaly == "divergence"
    assert all(d.skip and d.lr_scale == 1.0 for d in checked)  # the snapshot is scored, not trained
    assert [d.rollback_check for d in checked] == ["score"] * (ROLLBACK_CHECK_STEPS - 1) + ["keep"]
    check = policy.last_rollback_check
    assert check["verdict"] == "weights" and policy.state.lr_scale == pytest.approx(0.5)
    assert check["scored_loss"] == pytest.approx(check["snapshot_loss"], rel=0.05)


def test_a_rise_of_the_objective_itself_undoes_the_rollback_back_off_and_level() -> None:
    """A curriculum stage: the data gets 3x harder at step 80, for every weights alike (the snapshot's too)."""
    policy, run = ExplosionPolicy(), _LossOfTheWeights(growth=0.999)
    for _ in range(80):
        run.step(policy)
    level, ceiling = policy.state.level, policy.state.lr_ceiling
    run.objective = 3.0
    decisions = [run.step(policy)]
    while decisions[-1].rollback_check not in ("keep", "undo"):
        decisions.append(run.step(policy))
        assert len(decisions) < 40
    aside_loss = run.aside
    start = next(i for i, d in enumerate(decisions) if d.rollback_check == "start")
    undo = decisions[-1]
    assert len(decisions) == start + 1 + ROLLBACK_CHECK_STEPS
    assert undo.rollback_check == "undo" and "undo_rollback" in undo.actions
    check = policy.last_rollback_check
    assert check["verdict"] == "objective"
    assert check["scored_loss"] > check["snapshot_loss"] + check["rise"] / 2
    assert policy.state.lr_scale == 1.0 and policy.state.lr_ceiling == ceiling and policy.state.level == level
    assert run.weights_loss == aside_loss < run.snapshot  # the weights of the divergence step are back
    later = [run.step(policy) for _ in range(40)]
    assert not any(d.skip or d.rollback or d.anomaly == "divergence" for d in later)  # judged from the new level
    assert policy.events[-1]["rollback_check"]["verdict"] == "objective"


def test_after_three_objective_shifts_divergence_is_no_longer_judged_but_loss_spikes_are() -> None:
    """A loss term whose weight is scheduled up: the objective climbs 1 % per step, whatever the weights."""
    policy, run = ExplosionPolicy(), _LossOfTheWeights(growth=0.999)
    for _ in range(60):
        run.step(policy)
    for _ in range(600):
        run.objective *= 1.01
        run.step(policy)
    assert policy.counts["objective_shift"] == OBJECTIVE_SHIFTS_TO_TRUST and policy.state.divergence_off
    assert policy.state.lr_scale == 1.0 and "stop" not in policy.counts
    assert policy.counts["rollback_check"] == OBJECTIVE_SHIFTS_TO_TRUST * ROLLBACK_CHECK_STEPS
    run.objective *= 1e4  # one bad batch is still skipped
    assert run.step(policy).anomaly == "loss_spike"


def _in_a_rollback_check() -> tuple[ExplosionPolicy, _LossOfTheWeights]:
    """A policy just past the divergence step of a curriculum stage (the objective 3x harder at step 80)."""
    policy, run = ExplosionPolicy(), _LossOfTheWeights(growth=0.999)
    for _ in range(80):
        run.step(policy)
    run.objective = 3.0
    while run.step(policy).rollback_check != "start":
        pass
    return policy, run


def test_a_rollback_check_the_adapter_cannot_keep_aside_leaves_the_rollback_and_back_off() -> None:
    policy, run = _in_a_rollback_check()
    policy.abandon_rollback_check()
    assert policy.counts["rollback_check_unavailable"] == 1 and policy.state.lr_scale == pytest.approx(0.5)
    assert run.step(policy).rollback_check is None


def test_a_checkpoint_written_during_a_rollback_check_resumes_with_the_rollback_standing() -> None:
    policy, _ = _in_a_rollback_check()
    resumed = ExplosionPolicy()
    resumed.load_state_dict(policy.state_dict())
    assert resumed.state.check_steps_left == 0 and resumed.state.lr_scale == pytest.approx(0.5)


def test_snapshots_are_refreshed_early_so_a_rollback_never_discards_most_of_a_young_run() -> None:
    policy, run = ExplosionPolicy(), _LossOfTheWeights(growth=0.999)
    snapshots = [d.step for d in (run.step(policy) for _ in range(300)) if d.snapshot]
    assert snapshots[0] == 1 and snapshots[1] <= 2 * SNAPSHOT_HEALTHY_STREAK  # not the initial weights for long
    assert len([step for step in snapshots if step <= 100]) >= 4  # a doubling schedule, not one per 100 steps
    assert all(b - a <= 100 + SNAPSHOT_HEALTHY_STREAK for a, b in itertools.pairwise(snapshots))


def test_a_divergence_never_rolls_back_to_a_snapshot_whose_own_loss_was_higher() -> None:
    """A snapshot of weights that scored 5.0 (a run that learned since, then met harder data): restoring them
    cannot lower a loss that diverged to about 2."""
    policy = _warmed_with_loss()
    stale = LossTrend(10)
    stale.update(5.0)
    loss, decisions = 1.5, []
    while not decisions or decisions[-1].anomaly != "divergence":
        loss *= 1.15
        policy._trend_at_snapshot = stale.state_dict()  # no refresh: the snapshot stays the old weights
        decisions.append(policy.step(Observation(1.0, loss=loss)))
        assert len(decisions) < 20
    divergence = decisions[-1]
    assert not divergence.rollback and divergence.rollback_check is None
    assert divergence.skip and policy.state.lr_scale == pytest.approx(0.5)  # the rise is still evidence


def test_a_divergence_with_nothing_to_roll_back_to_is_judged_once_per_level() -> None:
    """The skipped step leaves the weights where they diverged, so the next batches score the same level: the same
    evidence, not a new divergence each (which halved the LR on every step, 11 times in 11 steps). The next
    verdict needs a rise of its own above the diverged level."""
    policy = _warmed_with_loss()
    stale = LossTrend(10)
    stale.update(5.0)
    loss, decision = 1.5, None
    while decision is None or decision.anomaly != "divergence":
        loss *= 1.15
        policy._trend_at_snapshot = stale.state_dict()
        decision = policy.step(Observation(1.0, loss=loss))
    assert not decision.rollback and policy.state.lr_scale == pytest.approx(0.5)
    rng = random.Random(1)
    for _ in range(30):  # the diverged weights, unchanged: the same level, the per-batch noise of the run
        policy._trend_at_snapshot = stale.state_dict()
        same = policy.step(Observation(1.0, loss=loss * (1 + 0.02 * rng.gauss(0.0, 1.0))))
        assert same.anomaly != "divergence" and not same.skip
    assert policy.counts["divergence"] == 1 and policy.state.lr_scale >= 0.5
    decisions = []
    for _ in range(20):  # the loss climbs on from there: new evidence
        loss *= 1.15
        policy._trend_at_snapshot = stale.state_dict()
        decisions.append(policy.step(Observation(1.0, loss=loss)))
    assert any(d.anomaly == "divergence" for d in decisions) and policy.counts["divergence"] >= 2


def test_a_snapshot_that_scores_no_better_than_the_diverged_weights_is_undone_but_the_back_off_stays() -> None:
    policy, _ = _in_a_rollback_check()
    state = policy.state
    # a snapshot taken above the lowest loss (1.0): l_s = 1.8, the diverged loss 2.0, the rise 1.0
    state.check_snapshot_loss, state.check_diverged_loss, state.check_rise = 1.8, 2.0, 1.0
    decisions = [policy.step(Observation(1.0, loss=1.95)) for _ in range(ROLLBACK_CHECK_STEPS)]
    assert decisions[-1].rollback_check == "undo" and "undo_rollback" in decisions[-1].actions
    assert policy.last_rollback_check["verdict"] == "no_better"  # 1.95 > (1.8 + 2.0) / 2, < 1.8 + 1.0 / 2
    assert policy.state.lr_scale == pytest.approx(0.5) and "objective_shift" not in policy.counts


def test_gradient_spikes_while_the_loss_falls_are_clipped_but_never_tighten_the_clip() -> None:
    """A GAN's players or a model leaving a plateau: unusual norms, no damage; only a loss that rises tightens."""
    policy = _warmed_with_loss()
    losses = _losses(100, start=1.8, seed=1)
    decisions = [policy.step(Observation(10.0 if i % 2 else 1.0, loss=loss)) for i, loss in enumerate(losses)]
    spikes = [d for d in decisions if d.anomaly == "spike"]
    assert len(spikes) > DEFAULT_BUDGETS["clip"] and all("clip" in d.actions for d in spikes)
    assert max(d.level for d in decisions) == RUNGS.index("clip")
    unjudged = ExplosionPolicy()
    for norm in _healthy_norms(60):
        unjudged.step(Observation(norm))  # no loss at all: no evidence that the norms are harmless
    climbed = [unjudged.step(Observation(10.0 if i % 2 else 1.0)) for i in range(40)]
    assert max(d.level for d in climbed) == RUNGS.index("tight_clip")


def test_a_negative_loss_withdraws_the_back_off_that_divergence_verdicts_on_it_set() -> None:
    """A policy-gradient loss judged as a positive objective until its first negative value."""
    policy = _warmed_with_loss()
    loss = 1.5
    while policy.counts.get("divergence", 0) == 0:
        loss *= 1.15
        policy.step(Observation(1.0, loss=loss))
    while policy.state.check_steps_left:  # the snapshot scores what it scored: the rollback stands
        policy.step(Observation(1.0, loss=1.8))
    assert policy.last_rollback_check["verdict"] == "weights"
    assert policy.state.lr_scale == pytest.approx(0.5) and policy.state.level > RUNGS.index("clip")
    policy.step(Observation(1.0, loss=-0.2))
    assert policy.loss_rules_off_reason is not None and policy.counts["loss_verdicts_withdrawn"] == 1
    assert policy.state.lr_scale == 1.0 and policy.lr_ceiling() == 1.0 and policy.state.level == RUNGS.index("clip")


def test_an_unstable_start_is_clipped_against_the_first_steps_during_the_warmup() -> None:
    """The z-score needs 25 steps of history; a norm 10x above the warm-up's geometric mean is clipped anyway."""
    policy = ExplosionPolicy()
    decisions = [policy.step(Observation(1.0 * 3.0**step)) for step in range(8)]
    clipped = [d for d in decisions if "clip" in d.actions]
    assert clipped[0].step == 5 and all(d.anomaly == "spike" for d in clipped)  # 81 > 10 x (1 * 3 * 9 * 27)^(1/4)
    unclipped_mean = 3.0**3.5  # the geometric mean of 1, 3, ..., 3**7
    assert policy.statistics.typical_norm < 0.5 * unclipped_mean  # it learned the clipped norms, not the explosion


def test_a_plain_sgd_step_larger_than_the_weights_themselves_is_clipped_to_their_norm() -> None:
    policy = ExplosionPolicy()
    decision = policy.step(Observation(100.0, weight_norm=10.0, step_size=0.5))  # |lr g| = 50 on |w| = 10
    assert decision.anomaly == "update_ratio" and decision.evidence == "update"
    assert decision.clip_threshold == pytest.approx(1.0 * 10.0 / 0.5)
    assert decision.clip_coefficient * 100.0 * 0.5 == pytest.approx(10.0)  # the step now moves |w| by 100 %
    assert policy.step(Observation(10.0, weight_norm=10.0, step_size=0.5)).anomaly is None  # 50 %: allowed


def test_a_back_off_ceiling_is_a_learning_rate_so_a_decaying_schedule_below_it_runs_at_its_own_rate() -> None:
    policy = _warmed_policy(budgets={"skip": 1})
    for _ in range(2):  # the 2nd non-finite step backs off at a scheduled lr of 1.0: the ceiling becomes lr 0.5
        policy.step(Observation(math.nan, nonfinite=True, lr=1.0))
    assert policy.state.lr_scale == pytest.approx(0.5) and policy.state.lr_ceiling_absolute == pytest.approx(0.5)
    typical = policy.statistics.typical_norm
    at_same_lr = [policy.step(Observation(typical, lr=1.0)).lr_scale for _ in range(60)]
    assert max(at_same_lr) == pytest.approx(0.5)  # the rate that failed is not tried again
    after_decay = [policy.step(Observation(typical, lr=0.1)).lr_scale for _ in range(60)]
    assert after_decay[-1] == pytest.approx(1.0)  # 0.1 is below the 0.5 that the evidence supports


def test_max_norm_is_an_absolute_ceiling_that_is_off_by_default() -> None:
    assert ExplosionPolicy().step(Observation(5.0)).clip_coefficient == 1.0
    decision = ExplosionPolicy(PolicyConfig(max_norm=1.0)).step(Observation(5.0))
    assert decision.clip_threshold == 1.0 and decision.clip_coefficient == pytest.approx(0.2)
    assert decision.anomaly is None  # a ceiling is not an anomaly: it never escalates


def test_zero_gradients_carry_no_information_and_the_normal_gradients_after_them_are_not_spikes() -> None:
    policy = ExplosionPolicy()
    for _ in range(40):  # a frozen phase: the loss term is not switched on yet
        assert policy.step(Observation(0.0, loss=0.0)).anomaly is None
    assert policy.statistics.count == 0 and policy.loss_statistics.count == 0
    stream = zip(_healthy_norms(200), _losses(200), strict=True)
    decisions = [policy.step(Observation(norm, loss=loss)) for norm, loss in stream]
    assert max(d.level for d in decisions) == RUNGS.index("clip")
    assert not any(d.skip for d in decisions) and policy.counts["zero_gradient"] == 40


def test_a_nonfinite_gradient_on_some_ranks_only_is_a_fault_to_skip_not_an_fp16_overflow() -> None:
    policy = _warmed_policy()
    decision = policy.step(Observation(math.nan, nonfinite=True, loss_scale=2.0**16, rank_local=True))
    assert decision.anomaly == "nonfinite" and decision.skip


def test_persistent_fp16_overflow_with_a_collapsed_scale_climbs_to_stop() -> None:
    policy = _warmed_policy()
    scale, decisions = 2.0**16, []
    for _ in range(100):
        decisions.append(policy.step(Observation(math.inf, nonfinite=True, loss_scale=scale)))
        scale /= 2  # the scaler halves on every overflow
        if decisions[-1].stop:
            break
    assert decisions[0].anomaly == "amp_overflow"  # the scaler's business while the scale is sane
    assert decisions[-1].stop and decisions[-1].anomaly == "loss_scale_collapse"


@pytest.mark.parametrize(
    "argument",
    ["zscore_threshold", "growth_factor", "loss_scale_floor", "loss_zscore_threshold", "max_update_ratio", "max_norm"],
)
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_infinite_or_nan_thresholds_are_rejected_naming_the_argument(argument: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"`{argument}` must be a finite number"):
        PolicyConfig(**{argument: value})


def test_policy_decisions_are_identical_to_the_recorded_ones() -> None:
    """Every decision of seeded streams under six configurations (spikes, non-finite steps, fp16 overflows and
    collapses, loss spikes, divergences with rollback checks kept and undone, moved objectives, new gradient scales,
    negative losses; checkpoint round trips and the adapter's calls at random steps) and the final state are what
    the policy decided when ``tests/fixtures/policy_golden.json`` was recorded, bit for bit (see
    ``tests/helpers/policy_golden.py``; the floats are plain Python arithmetic, exact on one platform)."""
    recorded = json.loads(policy_golden.FIXTURE.read_text())
    regenerated = json.loads(policy_golden.dumps(policy_golden.golden()))  # through JSON, as it was recorded
    for key, stream in recorded["recorded"].items():
        now = regenerated["recorded"][key]
        for before, after in zip(stream["decisions"], now["decisions"], strict=True):
            assert policy_golden.dumps(after) == policy_golden.dumps(before), f"{key}: the decision changed"
        assert policy_golden.dumps(now) == policy_golden.dumps(stream), f"{key}: the final state changed"
    assert regenerated["digested"] == recorded["digested"]
