"""ExplosionGuard's rollback snapshot options: where the snapshot lives, what it keeps, and what a rollback
does when a snapshot is missing. Each training is a real tiny Lightning run whose gradients blow up for
five steps (x1e4) from step 30, so that with budgets of one the ladder reaches ``rollback`` at step 35."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradstab.callbacks.guard import SNAPSHOT_DIRNAME, ExplosionGuard
from lightning_gradstab.guard.config import PolicyConfig
from tests.helpers.trainers import quiet_trainer
from tests.scripts.guard_models import CLIMB_FAULTS, TinyRegression, regression_loader

torch.set_num_threads(1)

BUDGETS = {"clip": 1, "tight_clip": 1, "skip": 1, "lr_backoff": 1}
FAULTS = CLIMB_FAULTS
ROLLBACK_STEP = 35
RUN_FILE = r"gradstab-rollback-\d+-[0-9a-f]{8}-rank0\.bin"  # pid, a random token, the rank
STEPS = 45


class _Probe(Callback):
    """After every optimizer step: the flat weights, Adam's flat first moments and where the snapshot lives."""

    def __init__(self, guard: ExplosionGuard) -> None:
        self.guard = guard
        self.weights: dict[int, torch.Tensor] = {}
        self.moments: dict[int, torch.Tensor] = {}
        self.locations: set[str | None] = set()
        self.files_seen: set[Path] = set()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        self.weights[step] = torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone()
        state = trainer.optimizers[0].state
        moments = [state[p]["exp_avg"].flatten() for p in pl_module.parameters() if p in state]
        self.moments[step] = torch.cat(moments).clone() if moments else torch.empty(0)
        snapshot = self.guard.rollback_snapshot
        self.locations.add(snapshot.location)
        if snapshot.location == "disk":
            self.files_seen.add(snapshot.path)


def _train(tmp_path: Path, **options: Any) -> tuple[ExplosionGuard, _Probe]:
    guard = ExplosionGuard(console_summary=False, config=PolicyConfig(budgets=BUDGETS, snapshot_every=10), **options)
    probe = _Probe(guard)
    trainer = quiet_trainer(
        max_steps=STEPS, callbacks=[guard, probe], default_root_dir=str(tmp_path), log_every_n_steps=1
    )
    trainer.fit(TinyRegression(optimizer="adam", lr=0.01, faults=FAULTS), regression_loader())
    return guard, probe


def _rollback_steps(guard: ExplosionGuard) -> list[int]:
    return [event["step"] for event in guard.guard_events() if "rollback" in event["actions"]]


def test_a_disk_snapshot_rolls_back_to_exactly_the_weights_a_memory_snapshot_does(tmp_path: Path) -> None:
    memory_guard, memory = _train(tmp_path / "memory")
    disk_guard, disk = _train(tmp_path / "disk", snapshot_location="disk")
    assert _rollback_steps(memory_guard) == _rollback_steps(disk_guard) == [ROLLBACK_STEP]
    assert memory.locations == {"memory"} and disk.locations == {"disk"}
    # the file lived under the log directory and is removed when fit ends (a disk snapshot is not carried on)
    (path,) = disk.files_seen  # one file for the whole fit, private to this run and rank
    assert path.parent == tmp_path / "disk" / SNAPSHOT_DIRNAME and re.fullmatch(RUN_FILE, path.name)
    assert not any(path.exists() for path in disk.files_seen)
    for step in memory.weights:
        assert torch.equal(memory.weights[step], disk.weights[step]), step
        assert torch.equal(memory.moments[step], disk.moments[step]), step


def test_a_snapshot_above_max_bytes_goes_to_disk_said_once(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard, probe = _train(tmp_path, snapshot_max_bytes=1024, snapshot_dir=tmp_path / "rollback")
    to_disk = [w for w in caught if "above max_bytes=1024" in str(w.message)]
    assert len(to_disk) == 1 and "background thread" in str(to_disk[0].message)
    (path,) = probe.files_seen
    assert probe.locations == {"disk"} and path.parent == tmp_path / "rollback" and re.fullmatch(RUN_FILE, path.name)
    assert _rollback_steps(guard) == [ROLLBACK_STEP] and len(probe.weights) == STEPS


def test_keep_weights_restores_the_weights_and_leaves_the_optimizer_state(tmp_path: Path) -> None:
    full_guard, full = _train(tmp_path / "full")
    weights_guard, weights_only = _train(tmp_path / "weights", snapshot_keep="weights")
    assert _rollback_steps(full_guard) == _rollback_steps(weights_guard) == [ROLLBACK_STEP]
    snapshot_step = full_guard.snapshot_step
    assert snapshot_step is not None and snapshot_step == weights_guard.snapshot_step and snapshot_step <= 30
    # policy step s runs on the weights left by s - 1 optimizer steps: both return to the snapshot's weights
    for probe in (full, weights_only):
        assert torch.equal(probe.weights[ROLLBACK_STEP], probe.weights[snapshot_step - 1])
    # the exact rollback returns Adam's moments too; keep="weights" leaves those of the step before
    assert torch.equal(full.moments[ROLLBACK_STEP], full.moments[snapshot_step - 1])
    assert torch.equal(weights_only.moments[ROLLBACK_STEP], weights_only.moments[ROLLBACK_STEP - 1])
    assert not torch.equal(weights_only.moments[ROLLBACK_STEP], weights_only.moments[snapshot_step - 1])


def test_a_failed_disk_write_turns_the_rollback_into_a_skip_said_once(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the snapshot folder should be")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard, probe = _train(tmp_path, snapshot_location="disk", snapshot_dir=blocker)
    skipped = [w for w in caught if "asks for a rollback but a rank holds no usable" in str(w.message)]
    assert len(skipped) == 1
    assert _rollback_steps(guard) == [ROLLBACK_STEP]
    # the step was skipped, not restored: the weights are those the step before left
    assert torch.equal(probe.weights[ROLLBACK_STEP], probe.weights[ROLLBACK_STEP - 1])
    assert len(probe.weights) == STEPS


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"snapshot_keep": "optimizer"}, ValueError, r"`snapshot_keep` must be one of .*'optimizer'"),
        ({"snapshot_location": "gpu"}, ValueError, r"`snapshot_location` must be one of .*'gpu'"),
        ({"snapshot_max_bytes": 0}, ValueError, r"`snapshot_max_bytes` must be a positive int .* got 0"),
        ({"snapshot_max_bytes": "1GB"}, ValueError, r"`snapshot_max_bytes` must be a positive int .* '1GB'"),
        ({"snapshot_dir": 3}, TypeError, r"`snapshot_dir` must be a path"),
    ],
)
def test_bad_snapshot_options_are_rejected_by_name(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ExplosionGuard(**options)


@pytest.mark.parametrize(
    "options",
    [
        {"snapshot_keep": "weights"},
        {"snapshot_location": "disk"},
        {"snapshot_max_bytes": 2**30},
        {"snapshot_dir": "rollback"},
    ],
)
def test_snapshot_options_contradict_a_ladder_that_never_rolls_back(options: dict) -> None:
    (name,) = options
    with pytest.raises(ValueError, match=rf"`{name}`=.* configures rung 'rollback', which is above `max_rung`='skip'"):
        ExplosionGuard(max_rung="skip", **options)
    ExplosionGuard(max_rung="rollback", **options)  # fine where the ladder can roll back


class _SaveAt(Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("location", ["memory", "disk"])
def test_a_checkpoint_carries_a_memory_snapshot_but_not_a_disk_one(tmp_path: Path, location: str) -> None:
    path = tmp_path / "step20.ckpt"
    guard = ExplosionGuard(console_summary=False, config=PolicyConfig(snapshot_every=10), snapshot_location=location)
    trainer = quiet_trainer(max_steps=25, callbacks=[guard, _SaveAt(20, path)], default_root_dir=str(tmp_path))
    trainer.fit(TinyRegression(optimizer="adam", lr=0.01), regression_loader())
    saved = torch.load(path, weights_only=True)["gradstab_guard_snapshot"]
    resumed = ExplosionGuard(console_summary=False, snapshot_location=location)
    resumed.on_load_checkpoint(trainer, trainer.lightning_module, {"gradstab_guard_snapshot": saved})
    if location == "memory":
        assert saved["step"] is not None and resumed.snapshot_step == saved["step"] <= 20
    else:
        assert saved["step"] is None and "tensors" not in saved and resumed.snapshot_step is None
