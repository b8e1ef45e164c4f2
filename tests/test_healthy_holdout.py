"""Every task of the held-out healthy set builds with a small step count and trains unguarded to a finite task
metric; ``--suite holdout`` of the benchmark runner knows them."""

from __future__ import annotations

import math

import pytest

from benchmarks import divergence
from benchmarks.healthy_holdout import HOLDOUT_TASKS, METRICS
from benchmarks.healthy_holdout2 import HOLDOUT2_TASKS
from benchmarks.healthy_tasks import HEALTHY_TASKS

STEPS = 4


def test_the_holdout_set_has_eight_new_shapes_each_with_a_named_task_metric():
    assert len(HOLDOUT_TASKS) == 8
    assert set(METRICS) == set(HOLDOUT_TASKS)
    assert not set(HOLDOUT_TASKS) & set(HEALTHY_TASKS)
    assert all(task.kind == "healthy" for task in HOLDOUT_TASKS.values())
    assert set(HOLDOUT_TASKS) <= set(divergence.all_tasks())
    assert set(METRICS.items()) <= set(divergence.healthy_metrics().items())


@pytest.mark.parametrize("name", [*HOLDOUT_TASKS, *HOLDOUT2_TASKS])
def test_task_builds_and_one_unguarded_fit_runs_to_a_finite_metric(name):
    """Both held-out sets (:mod:`benchmarks.healthy_holdout2` is the second)."""
    built = divergence.healthy_tasks()[name].build(seed=0, steps=STEPS)
    assert built.steps == STEPS and built.max_steps >= STEPS
    record = divergence.run_one(name, "none", seed=0, steps=STEPS)
    assert record["status"] == "finished", record["error"]
    assert record["steps_done"] == STEPS
    assert math.isfinite(record["initial_loss"]) and math.isfinite(record["final_loss"])


def test_the_runner_accepts_the_holdout_suite_and_refuses_its_tasks_in_the_divergence_suite(tmp_path, monkeypatch):
    monkeypatch.setattr(divergence, "freeze_package", lambda: "test")  # no copy of the package on sys.path
    with pytest.raises(SystemExit):
        divergence.main(["--tasks", "adam_restart", "--methods", "none", "--seeds", "1", "--jobs", "1"])
    out = tmp_path / "holdout"
    code = divergence.main(
        [
            "--suite",
            "holdout",
            "--tasks",
            "adam_restart",
            "--methods",
            "none",
            "--seeds",
            "1",
            "--jobs",
            "1",
            "--steps",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# Held-out healthy shapes") and "| adam_restart | error rate |" in text
