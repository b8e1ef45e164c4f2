"""The suite's own files and state never corrupt, crash or leak a user's run.

One test (or one parametrized family) per fault-injection scenario of docs/compatibility.md (rows 8-20),
each a real tiny Lightning training. Most runs are the 8-32-32-1 regression MLP of
``tests/scripts/guard_models.py`` trained with Adam whose gradients blow up x1e4 on steps 30-34, so that with
budgets of one the ladder asks for a rollback at step 35. The 2-process DDP case runs as
``tests/scripts/reliability_ddp.py``.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import TensorDataset

from lightning_gradstab import running
from lightning_gradstab.callbacks.guard import SNAPSHOT_CHECKPOINT_KEY, ExplosionGuard
from lightning_gradstab.guard.config import PolicyConfig
from lightning_gradstab.guard.snapshot import RollbackSnapshot
from lightning_gradstab.running import GrowthWindow
from tests.helpers.trainers import quiet_trainer
from tests.scripts.guard_models import CLIMB_FAULTS, TinyRegression, regression_loader
from tests.scripts.reliability_ddp import ROLLBACK_STEP as DDP_ROLLBACK_STEP
from tests.scripts.reliability_ddp import STEPS as DDP_STEPS

torch.set_num_threads(1)

BUDGETS = {"clip": 1, "tight_clip": 1, "skip": 1, "lr_backoff": 1}
FAULTS = CLIMB_FAULTS
ROLLBACK_STEP = 35
STEPS = 40
UNUSABLE = "asks for a rollback but a rank holds no usable rollback snapshot"


def _guard(**options: Any) -> ExplosionGuard:
    return ExplosionGuard(console_summary=False, config=PolicyConfig(budgets=BUDGETS, snapshot_every=10), **options)


class _Weights(Callback):
    """The flat weights after every optimizer step; ``at_step`` runs a function after that step."""

    def __init__(self, at_step: dict[int, Any] | None = None) -> None:
        self.by_step: dict[int, torch.Tensor] = {}
        self.at_step = at_step or {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.by_step[trainer.global_step] = torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone()
        if trainer.global_step in self.at_step:
            self.at_step[trainer.global_step](trainer)


def _fit(
    folder: Path, guard: ExplosionGuard, model: pl.LightningModule | None = None, steps: int = STEPS, **kwargs: Any
) -> tuple[_Weights, pl.Trainer]:
    probe, ckpt_path = _Weights(kwargs.pop("at_step", None)), kwargs.pop("ckpt_path", None)
    trainer = quiet_trainer(max_steps=steps, callbacks=[guard, probe], default_root_dir=str(folder), **kwargs)
    model = model or TinyRegression(optimizer="adam", lr=0.01, faults=FAULTS)
    trainer.fit(model, regression_loader(), ckpt_path=ckpt_path)
    return probe, trainer


def _snapshot_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*gradstab-rollback-*")) + sorted(folder.rglob("rollback-rank*"))


def _rollbacks(guard: ExplosionGuard) -> list[int]:
    return [event["step"] for event in guard.guard_events() if "rollback" in event["actions"]]


# -- files that belong to one run -------------------------------------------------------------------------------


def test_two_runs_in_one_folder_each_roll_back_to_their_own_weights(tmp_path: Path) -> None:
    """Run B trains, snapshots and finishes in the same ``default_root_dir`` while run A is between its snapshot
    and its rollback (a sweep, two terminals); A still returns to its own weights, as with a memory snapshot."""
    reference, _ = _fit(tmp_path / "reference", _guard())

    def run_b(_: pl.Trainer) -> None:
        _fit(tmp_path / "shared", _guard(snapshot_location="disk"), TinyRegression(optimizer="adam", seed=1))

    guard_a = _guard(snapshot_location="disk")
    run_a, _ = _fit(tmp_path / "shared", guard_a, at_step={33: run_b})
    assert _rollbacks(guard_a) == [ROLLBACK_STEP]
    assert torch.equal(run_a.by_step[ROLLBACK_STEP], reference.by_step[ROLLBACK_STEP])
    assert _snapshot_files(tmp_path / "shared") == []  # each run deleted its own file, and only its own


def test_a_link_planted_in_the_snapshot_folder_is_never_written_through_and_files_are_private(tmp_path: Path) -> None:
    folder, victim = tmp_path / "shared", tmp_path / "precious.txt"
    folder.mkdir()
    victim.write_text("the user's file")
    (folder / "rollback-rank0.bin").symlink_to(victim)  # the name the suite used to write to
    guard, modes = _guard(snapshot_location="disk", snapshot_dir=folder), set()

    def record_mode(_: pl.Trainer) -> None:
        modes.add(stat.S_IMODE(os.stat(guard.rollback_snapshot.path).st_mode))

    _fit(tmp_path, guard, at_step={22: record_mode, 30: record_mode})
    assert _rollbacks(guard) == [ROLLBACK_STEP]
    assert victim.read_text() == "the user's file" and modes == {0o600}
    # a link at the very name the next file will be written to (temporary included) is not followed either
    snapshot = RollbackSnapshot(keep="weights", location="disk", directory=folder)
    temporary = snapshot.path.with_name(f".{snapshot.path.name}.tmp")
    temporary.symlink_to(victim)
    with pytest.warns(UserWarning, match="writing .* failed"):
        snapshot.take(nn.Linear(4, 4), step=1)
        snapshot.ready  # noqa: B018  (waits for nothing: reads the writer's outcome)
        snapshot.take(nn.Linear(4, 4), step=2)  # the failure of the first write is said here
    assert victim.read_text() == "the user's file" and temporary.is_symlink()


@pytest.mark.parametrize("damage", ["remove", "truncate", "corrupt"])
def test_a_snapshot_file_removed_truncated_or_corrupted_turns_the_rollback_into_a_skip_said_once(
    tmp_path: Path, damage: str
) -> None:
    guard = _guard(snapshot_location="disk")

    def spoil(_: pl.Trainer) -> None:
        path = guard.rollback_snapshot.path
        if damage == "remove":
            path.unlink()
        elif damage == "truncate":
            path.write_bytes(path.read_bytes()[:100])
        else:  # same size, other bytes: only the checksum tells
            data = path.read_bytes()
            path.write_bytes(bytes(b ^ 0xFF for b in data[:64]) + data[64:])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run, trainer = _fit(tmp_path, guard, at_step={33: spoil})
    assert trainer.global_step == STEPS  # no crash
    assert len([w for w in caught if UNUSABLE in str(w.message)]) == 1
    assert torch.equal(run.by_step[ROLLBACK_STEP], run.by_step[ROLLBACK_STEP - 1])  # skipped, not restored
    assert torch.isfinite(run.by_step[STEPS]).all()


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_a_corrupted_snapshot_on_one_rank_makes_every_rank_skip_the_rollback_without_a_hang(
    tmp_path: Path, ddp_runner: Any
) -> None:
    rank0, rank1 = ddp_runner("reliability_ddp.py", tmp_path, "corrupt", timeout=200)
    assert rank0["global_step"] == rank1["global_step"] == DDP_STEPS
    for rank in (rank0, rank1):
        assert [e["step"] for e in rank["events"] if "rollback" in e["actions"]] == [DDP_ROLLBACK_STEP]
        assert rank["weights"][str(DDP_ROLLBACK_STEP)] == rank["weights"][str(DDP_ROLLBACK_STEP - 1)]
    assert rank0["weights"] == rank1["weights"]  # both skipped: the replicas are still identical
    assert len([w for w in rank0["warnings"] if UNUSABLE in w]) == 1
    assert list((tmp_path / "snapshots").iterdir()) == []


def test_a_preempted_run_deletes_its_snapshot_file_and_a_killed_runs_file_is_named_not_deleted(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "snapshots"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left_by_a_kill = folder / f"gradstab-rollback-{int(dead.stdout)}-0badc0de-rank0.bin"
    left_by_a_kill.write_bytes(b"\0" * 128)

    guard, own = _guard(snapshot_location="disk", snapshot_dir=folder), []

    def preempt(_: pl.Trainer) -> None:
        own.append(guard.rollback_snapshot.path)
        for _ in range(500):  # the background write of the step-23 snapshot lands
            if own[0].exists():
                break
            time.sleep(0.01)
        assert own[0].exists()
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning turns it into an exception at the end of the batch

    with warnings.catch_warnings(record=True) as caught, pytest.raises(BaseException, match="") as raised:
        warnings.simplefilter("always")
        _fit(tmp_path, guard, at_step={25: preempt})
    assert type(raised.value).__name__ == "SIGTERMException"
    assert not own[0].exists()
    assert _snapshot_files(folder) == [left_by_a_kill]  # this run's file is gone, the other one left alone
    named = [w for w in caught if "left by processes that are gone" in str(w.message)]
    assert len(named) == 1 and left_by_a_kill.name in str(named[0].message)


# -- verified before use, fresh per fit -------------------------------------------------------------------------


def test_a_callback_reused_for_a_second_fit_starts_it_clean(tmp_path: Path) -> None:
    guard = _guard()
    _fit(tmp_path / "first", guard)
    assert _rollbacks(guard) == [ROLLBACK_STEP] and guard.level > 1
    second_model = TinyRegression(optimizer="adam", lr=0.01, faults={30: "scale_grad"}, seed=1)
    run, _ = _fit(tmp_path / "second", guard, second_model)
    # the second fit is judged on its own: one spike is clipped, nothing of the first fit's ladder remains
    policy = guard.policy()
    assert policy.steps == STEPS and policy.counts.get("rollback", 0) == 0 and policy.lr_scale == 1.0
    assert [e["actions"] for e in policy.events] == [["clip"]]
    assert guard.snapshot_step is not None and guard.snapshot_step > 1  # taken in this fit, of this model
    first_weights = TinyRegression(seed=0).flat_weights()
    assert not any(torch.equal(weights, first_weights) for weights in run.by_step.values())


class _BatchNormRegression(pl.LightningModule):
    """8-16-1 MLP with BatchNorm; the batch of ``nan_step`` is all NaN (a corrupt shard)."""

    def __init__(self, nan_step: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
        self.nan_step = nan_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.nan_step:
            x = torch.full_like(x, float("nan"))
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_nan_batch_through_batchnorm_leaves_no_trace_in_its_running_statistics(tmp_path: Path) -> None:
    model, steps = _BatchNormRegression(nan_step=10), 20
    norm = model.net[1]
    before: dict[str, torch.Tensor] = {}

    def keep(_: pl.Trainer) -> None:
        before.update({name: buffer.clone() for name, buffer in norm.named_buffers()})

    guard = ExplosionGuard(console_summary=False)
    run, _ = _fit(tmp_path, guard, model, steps=steps, at_step={10: keep})  # after step 10: the NaN step's start
    (event,) = [e for e in guard.guard_events() if e["anomaly"] == "nonfinite"]
    assert event["actions"] == ["skip"]
    assert torch.equal(run.by_step[11], run.by_step[10])
    assert int(norm.num_batches_tracked) == steps - 1  # the skipped batch is not counted
    assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
    model.eval()
    x = TensorDataset(*regression_loader().dataset.tensors).tensors[0][:64]
    assert torch.isfinite(model.net(x)).all()  # eval() uses the running statistics
    assert before  # the skipped step's statistics were those before it (checked through the counter above)


def test_keeping_the_buffers_adds_no_host_read_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One read per fit learns which buffers a forward writes; each step then stays at the decision's one read."""
    guard, steps = ExplosionGuard(console_summary=False), 20
    reads: dict[str, list[str]] = {"on_train_batch_start": [], "on_before_optimizer_step": []}
    inside: list[str] = []
    for method in ("tolist", "item", "__bool__", "__float__", "__int__", "numpy"):
        original = getattr(torch.Tensor, method)

        def counted(self: torch.Tensor, *args: Any, _original: Any = original, _name: str = method) -> Any:
            if inside:
                reads[inside[-1]].append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, counted)
    for hook in reads:
        original_hook = getattr(guard, hook)

        def observed(*args: Any, _hook: Any = original_hook, _name: str = hook) -> None:
            inside.append(_name)
            try:
                _hook(*args)
            finally:
                inside.pop()

        monkeypatch.setattr(guard, hook, observed)
    _fit(tmp_path, guard, _BatchNormRegression(nan_step=10), steps=steps)
    assert reads["on_before_optimizer_step"] == ["tolist"] * steps  # the skip's buffer restore included
    assert reads["on_train_batch_start"] == ["tolist"]  # once per fit, at the second step


# -- checkpoints ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint after 25 steps of a guarded run (its memory snapshot inside)."""
    folder = tmp_path_factory.mktemp("checkpoint")
    _, trainer = _fit(folder, _guard(), steps=25)
    path = folder / "step25.ckpt"
    trainer.save_checkpoint(path)
    return path


class _WithNewBuffer(TinyRegression):
    """The model after a code change: a non-persistent buffer the checkpoint never saw."""

    def __init__(self) -> None:
        super().__init__(optimizer="adam", lr=0.01, faults=FAULTS)
        self.register_buffer("output_scale", torch.ones(1), persistent=False)


def test_a_checkpoint_snapshot_that_no_longer_fits_the_model_is_dropped_at_load(
    tmp_path: Path, checkpoint: Path
) -> None:
    guard, load_steps = _guard(), []

    class _WhenWarned(Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            load_steps.append(trainer.global_step)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_steps=45, callbacks=[guard, _WhenWarned()], default_root_dir=str(tmp_path))
        trainer.fit(_WithNewBuffer(), regression_loader(), ckpt_path=checkpoint)
    dropped = [w for w in caught if "rollback snapshot cannot be used" in str(w.message)]
    assert len(dropped) == 1 and "output_scale" in str(dropped[0].message)
    assert load_steps == [25]
    assert _rollbacks(guard) == [ROLLBACK_STEP] and not any(UNUSABLE in str(w.message) for w in caught)
    assert guard.snapshot_step is not None and guard.snapshot_step > 25  # the new snapshot, of this model


class _SnapshotAtTrainStart(Callback):
    """The guard's snapshot step and keep as the resumed fit starts (later steps may refresh the snapshot)."""

    def __init__(self, guard: ExplosionGuard) -> None:
        self.guard = guard
        self.seen: tuple[int | None, str] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.seen = (self.guard.snapshot_step, self.guard.rollback_snapshot.keep)


def test_resuming_keeps_the_constructors_snapshot_keep(tmp_path: Path, checkpoint: Path) -> None:
    guard = _guard(snapshot_keep="weights")
    at_start = _SnapshotAtTrainStart(guard)
    trainer = quiet_trainer(max_steps=26, callbacks=[guard, at_start], default_root_dir=str(tmp_path))
    trainer.fit(TinyRegression(optimizer="adam", lr=0.01, faults=FAULTS), regression_loader(), ckpt_path=checkpoint)
    saved_step = torch.load(checkpoint, weights_only=False)[SNAPSHOT_CHECKPOINT_KEY]["step"]
    assert saved_step is not None and at_start.seen == (saved_step, "weights")  # kept, as weights only
    snapshot = guard.rollback_snapshot  # and every snapshot taken after it is weights only too
    assert snapshot.keep == "weights" and snapshot.state_dict()["keep"] == "weights"


def _corrupt(state: dict[str, Any], how: str) -> None:
    counters = state["policies"]["0"]["counters"]
    if how == "level":
        counters["level"] = "3"
    elif how == "lr_scale":
        counters["lr_scale"] = 0.0
    else:
        del state["policies"]["0"]["loss_trend"]


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("level", r"`policies\.0\.counters\.level` must be an int rung level in \[0, 6\], got '3'"),
        ("lr_scale", r"`policies\.0\.counters\.lr_scale` must be a finite number > 0, got 0\.0"),
        ("missing", r"the key `policies\.0\.loss_trend` is missing"),
    ],
)
def test_a_hand_corrupted_guard_state_is_refused_at_load_naming_the_callback_and_key(
    tmp_path: Path, checkpoint: Path, how: str, message: str
) -> None:
    saved = torch.load(checkpoint, weights_only=False)
    (key,) = [key for key in saved["callbacks"] if key.startswith("ExplosionGuard")]
    _corrupt(saved["callbacks"][key], how)
    assert SNAPSHOT_CHECKPOINT_KEY in saved
    edited = tmp_path / "edited.ckpt"
    torch.save(saved, edited)
    guard = _guard()
    with pytest.raises(ValueError, match=rf"ExplosionGuard checkpoint state: {message}"):
        _fit(tmp_path, guard, steps=30, ckpt_path=edited)
    assert guard.policies == {}  # nothing half-loaded


# -- inputs -----------------------------------------------------------------------------------------------------


class _PerSampleLosses(TinyRegression):
    """Manual optimization that backpropagates a vector of per-sample losses with ``gradient=``."""

    def __init__(self) -> None:
        super().__init__(optimizer="adam", lr=0.01)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        x, y = batch
        losses = (self.net(x) - y).pow(2).flatten()
        optimizer.zero_grad()
        self.manual_backward(losses, gradient=torch.full_like(losses, 1.0 / losses.numel()))
        optimizer.step()


def test_a_vector_loss_backward_with_gradient_is_trained_and_judged_by_its_gradients(tmp_path: Path) -> None:
    model, guard = _PerSampleLosses(), ExplosionGuard(console_summary=False)
    initial_loss = model.full_loss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, guard, model, steps=30)
    said = [w for w in caught if "a loss of shape (32,)" in str(w.message)]
    assert len(said) == 1 and "by their gradients only" in str(said[0].message)
    assert guard.policy().steps == 30  # every step measured
    assert model.full_loss() < initial_loss  # trained, not crashed


def test_a_long_growth_window_costs_o_window_per_step_and_still_measures_growth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sizes: list[int] = []
    median = running._median

    def counted(values: list[float]) -> float:
        sizes.append(len(values))
        return median(values)

    monkeypatch.setattr(running, "_median", counted)
    window = GrowthWindow(window_steps=2000)
    for step in range(2000):
        window.push(1.001**step * (1.5 if step % 97 == 0 else 1.0))  # steady 0.1 % per step, a spike now and then
    factor = window.growth_factor()
    assert max(sizes) <= 32 * 31 // 2  # pairwise slopes of 32 block medians, not of 2000 points (2M)
    assert factor == pytest.approx(1.001**1999, rel=0.02)


def test_the_hydra_example_accepts_a_budgets_override() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from examples.runner import build_gradstab_callbacks
    from examples.schema import register_schemas
    from tests.helpers.subprocess_env import REPO

    register_schemas()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+gradstab.guard.config.budgets={skip:2}"])
    (guard,) = [c for c in build_gradstab_callbacks(cfg.gradstab) if isinstance(c, ExplosionGuard)]
    assert guard.config.budgets == {"skip": 2}
    # and a DictConfig handed over directly, as `instantiate` does by default
    assert ExplosionGuard(config=OmegaConf.create({"budgets": {"skip": 2}})).config.budgets == {"skip": 2}


def test_snapshot_file_names_differ_per_run_and_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = set()
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        for _ in range(2):
            names.add(RollbackSnapshot(location="disk", directory=tmp_path).path.name)
    assert len(names) == 4 and all(re.fullmatch(r"gradstab-rollback-\d+-[0-9a-f]{8}-rank[01]\.bin", n) for n in names)
