"""Every task of the healthy-but-unusual corpus builds, trains a few steps under ``ExplosionGuard()`` and reports a
finite task metric; the runner's bar for healthy training is the one issue 18 sets."""

from __future__ import annotations

import math

import pytest

from benchmarks import divergence
from benchmarks.healthy_tasks import HEALTHY_TASKS, METRICS

STEPS = 6


def test_the_corpus_has_at_least_eleven_kinds_each_with_a_named_task_metric():
    assert len(HEALTHY_TASKS) >= 11
    assert set(METRICS) == set(HEALTHY_TASKS)
    assert all(task.kind == "healthy" for task in HEALTHY_TASKS.values())


@pytest.mark.parametrize("name", list(HEALTHY_TASKS))
def test_task_trains_a_few_steps_under_the_guard_and_evaluates_to_a_finite_metric(name):
    record = divergence.run_one(name, "guard", seed=0, steps=STEPS)
    assert record["status"] in ("finished", "stopped"), record["error"]
    assert record["steps"] == STEPS
    assert math.isfinite(record["initial_loss"]) and math.isfinite(record["final_loss"])
    assert isinstance(record["final_loss"], float)


def test_same_seed_gives_the_same_batches_and_a_perturbation_changes_only_the_weights():
    task = HEALTHY_TASKS["adam_converge"]
    a, b = task.build(seed=2, steps=3), task.build(seed=2, steps=3)
    assert all((a.train_batches[0][k] == b.train_batches[0][k]).all() for k in a.train_batches[0])
    before = [p.detach().clone() for p in b.module.parameters()]
    divergence.perturb_weights(b.module, 1e-6, seed=2)
    changes = [
        float(((p.detach() - q).abs() / q.abs().clamp_min(1e-12)).max())
        for p, q in zip(b.module.parameters(), before, strict=True)
    ]
    assert 0 < max(changes) < 1e-4


def _cell(metrics, stopped=0, lr_scales=()):
    return {
        "metrics": list(metrics),
        "mean": sum(metrics) / len(metrics),
        "stopped": stopped,
        "crashed": 0,
        "lr_scales": list(lr_scales),
        "lr_min": min(lr_scales) if lr_scales else None,
    }


def test_healthy_bar_needs_no_stop_an_lr_multiplier_of_at_least_half_and_a_metric_within_2_percent_plus_001():
    none = _cell([0.10, 0.10])
    ok = {("t", "none"): none, ("t", "guard"): _cell([0.111, 0.111], lr_scales=[0.5, 1.0])}
    assert divergence.healthy_bar(ok, "t", "guard")[0] is True  # 0.111 <= 1.02 x 0.10 + 0.01 = 0.112
    worse = {("t", "none"): none, ("t", "guard"): _cell([0.113, 0.113], lr_scales=[1.0, 1.0])}
    assert divergence.healthy_bar(worse, "t", "guard")[0] is False
    stopped = {("t", "none"): none, ("t", "guard"): _cell([0.10, 0.10], stopped=1, lr_scales=[1.0, 1.0])}
    assert divergence.healthy_bar(stopped, "t", "guard")[0] is False
    cut = {("t", "none"): none, ("t", "guard"): _cell([0.10, 0.10], lr_scales=[1.0, 0.25])}
    passed, rule = divergence.healthy_bar(cut, "t", "guard")
    assert passed is False and "LR x0.25" in rule
