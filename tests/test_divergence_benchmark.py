"""The divergence benchmark runs end to end: one short unstable task under every method, one seed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import divergence
from benchmarks.divergence_tasks import TASKS
from benchmarks.peers import METHODS, OlmoSkipStep, resolve_method

TASK = "bad_init_scale"
STEPS = 40


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return divergence.run_all(
        [TASK], list(divergence.DEFAULT_METHODS), seeds=1, jobs=1, steps=STEPS, log=lambda _: None
    )


def test_every_method_runs_once_and_records_losses(results):
    assert [r["method"] for r in results] == list(divergence.DEFAULT_METHODS)
    for r in results:
        assert r["task"] == TASK and r["seed"] == 0
        if r["method"] == "clean":  # a reference only for tasks that inject bad batches; this one injects none
            assert r["status"] == "n/a"
            continue
        assert r["steps"] == STEPS
        assert r["status"] in ("finished", "stopped", "killed")
        assert math.isfinite(r["initial_loss"])
    json.dumps(results)  # the per-run records are what the .json file holds


def test_clean_reference_replays_the_run_with_the_injected_batches_replaced_by_the_originals():
    record = divergence.run_one("sgd_spikes", "clean", seed=0, steps=STEPS)
    assert record["injections"] == 0 and record["status"] == "finished"
    task = TASKS["sgd_spikes"]
    built = task.build(0, STEPS)
    assert built.clean_batches is not None and built.injections
    for step in built.injections:
        assert not torch.equal(built.train_batches[step]["x"], built.clean_batches[step]["x"])


def test_unprotected_training_diverges_and_a_fixed_clip_rescues_it(results):
    by_method = {r["method"]: r for r in results}
    assert not by_method["none"]["ok"]
    assert by_method["clip1"]["ok"]
    assert by_method["clip1"]["final_loss"] < by_method["clip1"]["initial_loss"]


def test_table_has_one_row_per_task_and_a_column_per_method(results):
    lines = divergence.table(results, [TASK], list(divergence.DEFAULT_METHODS))
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["task", "kind", *[f"`{m}`" for m in divergence.DEFAULT_METHODS], "best peer", "guard bar"]
    assert len(lines) == 3
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row[0] == TASK and row[1] == "unstable"
    assert row[2].startswith("0/1, ")
    assert row[-1] in ("meets", "**misses**")


def test_every_task_builds_a_seeded_instance_with_its_batches():
    for name, task in TASKS.items():
        a, b = task.build(seed=1, steps=3), task.build(seed=1, steps=3)
        assert a.steps == 3, name
        first_a, first_b = a.train_batches[0], b.train_batches[0]
        assert all((first_a[k] == first_b[k]).all() for k in first_a), name
        assert math.isfinite(a.module.evaluate(a.eval_batches)), name


def test_method_names_resolve_and_bad_ones_are_refused():
    assert set(divergence.DEFAULT_METHODS) <= set(METHODS)
    assert resolve_method("guard+max_rung='skip'")().callbacks[0].config.max_rung == "skip"
    assert resolve_method("guard+max_update_ratio=0.1")().callbacks[0].config.max_update_ratio == 0.1  # config
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        resolve_method("nope")
    with pytest.raises(ValueError, match="window"):
        OlmoSkipStep(window=1)


def _runs(task: str, method: str, losses: list[float], ok: list[bool], status: str = "finished") -> list[dict]:
    return [
        {"task": task, "method": method, "seed": s, "final_loss": v, "ok": k, "status": status, "actions": {}}
        for s, (v, k) in enumerate(zip(losses, ok, strict=True))
    ]


def test_the_bar_holds_the_guard_to_the_best_peer_where_unprotected_training_fails():
    runs = (
        _runs("t", "none", [9.0, 9.0, 0.5], [False, False, True])
        + _runs("t", "clip1", [1.0, 1.0, 1.0], [True] * 3)
        + _runs("t", "zclip", [0.9, 0.9, 0.9], [True, True, False])
    )
    methods = ["none", "clip1", "zclip", "guard"]
    near = divergence.aggregate(runs + _runs("t", "guard", [1.06, 1.06, 1.06], [True] * 3))
    assert divergence.best_peer(near, "t", methods) == "clip1"  # most ok seeds first, then the lowest loss
    assert divergence.bar(near, "t", "unstable", "guard", methods)[0] is True  # 1.06 <= 1.05 x 1.0 + 0.01
    worse = divergence.aggregate(runs + _runs("t", "guard", [1.07, 1.07, 1.07], [True] * 3))
    assert divergence.bar(worse, "t", "unstable", "guard", methods)[0] is False
    stopped = divergence.aggregate(runs + _runs("t", "guard", [0.5, 0.5, 0.5], [True] * 3, status="stopped"))
    assert divergence.bar(stopped, "t", "unstable", "guard", methods)[0] is False  # must finish every seed


def test_the_bar_on_a_healthy_task_is_relative_to_unprotected_training():
    runs = _runs("h", "none", [1.0] * 3, [True] * 3) + _runs("h", "clip1", [0.5] * 3, [True] * 3)
    methods = ["none", "clip1", "guard"]
    cells = divergence.aggregate(runs + _runs("h", "guard", [1.07] * 3, [True] * 3))
    assert divergence.bar(cells, "h", "healthy", "guard", methods)[0] is True  # 1.07 <= 1.05 x 1.0 + 0.02
    cells = divergence.aggregate(runs + _runs("h", "guard", [1.08] * 3, [True] * 3))
    assert divergence.bar(cells, "h", "healthy", "guard", methods)[0] is False
