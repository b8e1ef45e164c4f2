"""Fault-injection specification of ExplosionGuard on tiny real CPU trainings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_gradstab.callbacks.guard import (
    EVENTS_FILENAME,
    SUMMARY_FILENAME,
    ExplosionGuard,
    GradientExplosionError,
)
from lightning_gradstab.guard.config import PolicyConfig
from tests.helpers.trainers import quiet_trainer
from tests.scripts.guard_models import CLIMB_FAULTS, TinyRegression, regression_loader
from tests.scripts.guard_repeat_ddp import OverfitOneBatch

torch.set_num_threads(1)


def _fit(model: pl.LightningModule, steps: int, tmp_path: Path, callbacks: list, **trainer_options: Any) -> pl.Trainer:
    trainer = quiet_trainer(
        max_steps=steps, callbacks=callbacks, default_root_dir=str(tmp_path), log_every_n_steps=1, **trainer_options
    )
    trainer.fit(model, regression_loader())
    return trainer


def _guard(**options: Any) -> ExplosionGuard:
    return ExplosionGuard(console_summary=False, **options)


def _events(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / EVENTS_FILENAME).read_text().splitlines()]


class _WeightsAfterStep(Callback):
    """Records the weights right after one optimizer step and the optimizer state size then."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.weights: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step + 1:
            self.weights = pl_module.flat_weights()


def test_gradient_spike_is_clipped_on_its_step_and_weights_stay_close_to_the_clean_run(tmp_path: Path) -> None:
    spike_step = 40
    runs = {}
    for name, faults, callbacks in [
        ("clean", {}, [_guard()]),
        ("guarded", {spike_step: "scale_grad"}, [_guard()]),
        ("unguarded", {spike_step: "scale_grad"}, []),
    ]:
        probe = _WeightsAfterStep(spike_step)
        _fit(TinyRegression(faults=faults), spike_step + 1, tmp_path / name, [*callbacks, probe])
        runs[name] = probe.weights
    start = TinyRegression().flat_weights()
    clean_move = (runs["clean"] - start).norm()
    guarded_error = (runs["guarded"] - runs["clean"]).norm()
    unguarded_error = (runs["unguarded"] - runs["clean"]).norm()
    assert torch.isfinite(runs["guarded"]).all()
    assert guarded_error < 0.05 * clean_move  # the clipped step lands about where the clean one did
    assert unguarded_error > 100 * clean_move
    spike_events = [e for e in _events(tmp_path / "guarded") if e["anomaly"] == "spike"]
    assert [(e["step"], e["actions"]) for e in spike_events] == [(spike_step + 1, ["clip"])]


def test_nan_loss_step_is_skipped_and_training_continues(tmp_path: Path) -> None:
    nan_step, steps = 30, 80
    guard = _guard()
    probe = _WeightsAfterStep(nan_step)
    before = _WeightsAfterStep(nan_step - 1)
    model = TinyRegression(faults={nan_step: "nan_loss"})
    trainer = _fit(model, steps, tmp_path, [guard, probe, before])
    assert trainer.global_step == steps
    assert torch.equal(probe.weights, before.weights)  # the NaN step changed nothing
    assert torch.isfinite(model.flat_weights()).all()
    assert model.full_loss() < TinyRegression().full_loss()
    nonfinite = [e for e in _events(tmp_path) if e["anomaly"] == "nonfinite"]
    assert [(e["step"], e["actions"]) for e in nonfinite] == [(nan_step + 1, ["skip"])]


def test_learning_rate_100x_too_high_diverges_unguarded_and_ends_below_start_guarded(tmp_path: Path) -> None:
    steps, good_lr = 300, 0.05
    start_loss = TinyRegression().full_loss()
    unguarded = TinyRegression(lr=100 * good_lr)
    _fit(unguarded, steps, tmp_path / "unguarded", [])
    guard = _guard()
    guarded = TinyRegression(lr=100 * good_lr)
    _fit(guarded, steps, tmp_path / "guarded", [guard])
    diverged = unguarded.full_loss()
    assert not math.isfinite(diverged) or diverged > start_loss
    assert math.isfinite(guarded.full_loss()) and guarded.full_loss() < start_loss
    assert guard.policy().counts.get("skip", 0) > 0  # it took more than clipping


def test_healthy_run_never_goes_above_level_one_and_matches_the_unguarded_loss(
    tmp_path: Path, memory_logger: Any
) -> None:
    steps = 300
    unguarded = TinyRegression()
    _fit(unguarded, steps, tmp_path / "unguarded", [])
    guarded = TinyRegression()
    _fit(guarded, steps, tmp_path / "guarded", [_guard()], logger=memory_logger)
    levels = [value for _, value in memory_logger.metrics["gradstab/level"]]
    assert len(levels) == steps and max(levels) <= 1
    assert guarded.full_loss() == pytest.approx(unguarded.full_loss(), rel=0.01)


def _fit_from(
    model: pl.LightningModule, steps: int, tmp_path: Path, callbacks: list, ckpt_path: Path | None = None
) -> pl.Trainer:
    trainer = quiet_trainer(max_steps=steps, callbacks=callbacks, default_root_dir=str(tmp_path))
    trainer.fit(model, regression_loader(), ckpt_path=str(ckpt_path) if ckpt_path else None)
    return trainer


class _StateAtTrainStart(Callback):
    def __init__(self, guard: ExplosionGuard) -> None:
        self.guard = guard
        self.state: dict | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.state = json.loads(json.dumps(self.guard.state_dict()))


def test_resume_from_checkpoint_continues_with_the_guard_state_saved_in_it(tmp_path: Path) -> None:
    faults = {30: "scale_grad", 40: "nan_loss"}
    half, full = 48, 96
    first = _guard()
    trainer = _fit_from(TinyRegression(faults=faults), half, tmp_path / "first", [first])
    checkpoint = tmp_path / "half.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = json.loads(json.dumps(first.state_dict()))
    assert saved["policies"]["0"]["counters"]["counts"]["skip"] == 1  # a non-trivial state

    resumed = _guard()
    probe = _StateAtTrainStart(resumed)
    _fit_from(TinyRegression(faults=faults), full, tmp_path / "resumed", [resumed, probe], checkpoint)
    assert probe.state == saved
    policy = resumed.policy()
    assert policy.state.steps == full  # it counted on from the save, not from zero
    assert policy.events[: len(saved["policies"]["0"]["events"])] == saved["policies"]["0"]["events"]
    assert policy.statistics.count == full - 1  # every finite step since the start, the NaN one excluded


class _WeightsEveryStep(Callback):
    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self.optimizer_steps: dict[int, int] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.weights[trainer.global_step] = pl_module.flat_weights()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.weights[trainer.global_step] = pl_module.flat_weights()
        state = trainer.optimizers[0].state
        self.optimizer_steps[trainer.global_step] = int(next(iter(state.values()))["step"]) if state else 0


def test_skip_changes_neither_weights_nor_adam_state(tmp_path: Path) -> None:
    probe = _WeightsEveryStep()
    _fit(TinyRegression(lr=1e-3, optimizer="adam", faults={30: "nan_loss"}), 40, tmp_path, [_guard(), probe])
    assert torch.equal(probe.weights[31], probe.weights[30])
    assert probe.optimizer_steps[31] == probe.optimizer_steps[30] == 30  # Adam's step count did not move
    assert probe.optimizer_steps[40] == 39


class _LearningRates(Callback):
    """The lr the optimizer used inside each step, and the lr the scheduler left after it.

    Its step post-hook is registered before the guard's (which restores the lr), so it sees the used value;
    a pre-hook would not: it runs before the closure, hence before the guard acts.
    """

    def __init__(self) -> None:
        self.during: list[float] = []
        self.after: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        trainer.optimizers[0].register_step_post_hook(
            lambda optimizer, args, kwargs: self.during.append(optimizer.param_groups[0]["lr"])
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.after.append(trainer.optimizers[0].param_groups[0]["lr"])


class _WithScheduler(TinyRegression):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99)  # chainable: reads group lr
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_lr_backoff_scales_the_step_and_never_corrupts_the_scheduler(tmp_path: Path) -> None:
    budgets = {"clip": 1, "tight_clip": 1, "skip": 1}
    guard = _guard(config=PolicyConfig(budgets=budgets, backoff_factor=0.5, lr_recovery_steps=5))
    probe = _LearningRates()
    faults = dict(CLIMB_FAULTS)  # clip, tight clip, skip, back off, back off again
    _fit(_WithScheduler(faults=faults), 60, tmp_path, [guard, probe])
    scheduled = [0.05 * 0.99 ** (step + 1) for step in range(60)]
    assert probe.after == pytest.approx(scheduled, rel=1e-12)
    backoff = [e for e in _events(tmp_path) if e["rung"] == "lr_backoff" and e["anomaly"] == "nonfinite"]
    assert [(e["step"], e["actions"]) for e in backoff] == [(34, ["skip"]), (35, ["skip"])]
    # the next step runs at a quarter of the scheduled lr times one recovery factor; it recovers to the
    # ceiling: half of the learning rate at which the back-off episode began (step 34 ran on the lr of step 33)
    ratios = [during / (0.05 * 0.99**step) for step, during in enumerate(probe.during)]
    assert ratios[:33] == pytest.approx([1.0] * 33)
    assert ratios[35] == pytest.approx(0.25 * 2 ** (1 / 5))
    assert probe.during[-1] == pytest.approx(0.5 * 0.05 * 0.99**33)  # an lr, while the schedule decays below it


def test_rollback_restores_the_last_healthy_snapshot(tmp_path: Path) -> None:
    budgets = {"clip": 1, "tight_clip": 1, "skip": 1, "lr_backoff": 1}
    guard = _guard(config=PolicyConfig(budgets=budgets, snapshot_every=10))
    probe = _WeightsEveryStep()
    faults = dict(CLIMB_FAULTS)
    _fit(TinyRegression(faults=faults), 45, tmp_path, [guard, probe])
    rollback = next(e for e in _events(tmp_path) if "rollback" in e["actions"])
    assert rollback["step"] == 35 and rollback["rung"] == "rollback"
    assert guard.snapshot_step is not None and guard.snapshot_step <= 30
    # policy step s runs on the weights left by s - 1 optimizer steps
    assert torch.equal(probe.weights[rollback["step"]], probe.weights[guard.snapshot_step - 1])
    assert guard.policy().counts["rollback"] == 1


def test_stop_rung_ends_the_run_gracefully_with_a_json_reason(tmp_path: Path) -> None:
    budgets = {"clip": 1, "tight_clip": 1, "skip": 1, "lr_backoff": 1, "rollback": 1}
    guard = _guard(config=PolicyConfig(budgets=budgets))
    faults = {**dict.fromkeys(range(30, 60), "nan_grad"), 30: "scale_grad", 31: "scale_grad"}
    trainer = _fit(TinyRegression(faults=faults), 100, tmp_path, [guard])
    assert trainer.global_step == 36  # the sixth fault in a row (policy step 36) stops it
    summary = json.loads((tmp_path / SUMMARY_FILENAME).read_text())
    assert summary["stopped"] and "step 36: nonfinite at level 6 (stop)" in summary["stop_reason"]
    assert summary["optimizers"]["0"]["counts"]["stop"] == 1


def test_stop_rung_can_raise_instead(tmp_path: Path) -> None:
    budgets = {"clip": 1, "tight_clip": 1, "skip": 1, "lr_backoff": 1, "rollback": 1}
    faults = {**dict.fromkeys(range(30, 60), "nan_grad"), 30: "scale_grad", 31: "scale_grad"}
    with pytest.raises(GradientExplosionError, match="step 36: nonfinite"):
        guard = _guard(config=PolicyConfig(budgets=budgets), raise_on_stop=True)
        _fit(TinyRegression(faults=faults), 100, tmp_path, [guard])


def test_interventions_are_logged_as_scalars_events_and_a_console_table(
    tmp_path: Path, memory_logger: Any, capsys: pytest.CaptureFixture
) -> None:
    guard = ExplosionGuard(log_every_n_steps=50)
    _fit(TinyRegression(faults={40: "scale_grad"}), 60, tmp_path, [guard], logger=memory_logger)
    names = {"level", "clip_threshold", "clipped", "skipped", "lr_scale", "rollbacks", "zscore", "amp_overflow"}
    assert {f"gradstab/{name}" for name in names} <= set(memory_logger.metrics)
    clipped = dict(memory_logger.metrics["gradstab/clipped"])
    assert clipped[40] == 1.0 and sorted(clipped) == [0, 40, 50]  # the interval plus the intervention
    threshold = dict(memory_logger.metrics["gradstab/clip_threshold"])[40]
    (event,) = _events(tmp_path)
    assert event["clip_threshold"] == pytest.approx(threshold) and event["logging_step"] == 40
    assert "ExplosionGuard summary" in capsys.readouterr().out


def test_unwritable_log_directory_warns_once_and_the_stop_decision_still_stands(
    tmp_path: Path, memory_logger: Any
) -> None:
    blocker = tmp_path / "a_file"  # the log dir's parent is a regular file: root ignores permission bits
    blocker.write_text("")
    budgets = {"clip": 1, "tight_clip": 1, "skip": 1, "lr_backoff": 1, "rollback": 1}
    guard = _guard(config=PolicyConfig(budgets=budgets))
    faults = {**dict.fromkeys(range(30, 60), "nan_grad"), 30: "scale_grad", 31: "scale_grad"}
    with pytest.warns(UserWarning, match=r"lightning_gradstab: ExplosionGuard cannot write .*a_file") as warned:
        trainer = _fit(TinyRegression(faults=faults), 100, blocker / "logs", [guard], logger=memory_logger)
    assert len([w for w in warned if "ExplosionGuard cannot write" in str(w.message)]) == 1
    assert trainer.global_step == 36 and guard.stop_reason is not None  # same decisions as a writable dir
    assert len(memory_logger.metrics["gradstab/level"]) == 36
    assert guard.policy().counts["stop"] == 1


def test_gradient_accumulation_is_judged_once_per_optimizer_step(tmp_path: Path) -> None:
    guard = _guard()
    _fit(TinyRegression(), 8, tmp_path, [guard], accumulate_grad_batches=4)
    assert guard.policy().state.steps == 8


class _ManualRegression(TinyRegression):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()  # the guard acts inside this call


def test_manual_optimization_is_guarded_inside_optimizer_step(tmp_path: Path) -> None:
    guard, probe = _guard(), _WeightsEveryStep()
    _fit(_ManualRegression(faults={30: "nan_loss"}), 40, tmp_path, [guard, probe])
    assert torch.equal(probe.weights[31], probe.weights[30])
    assert torch.isfinite(probe.weights[40]).all()
    counts = guard.policy().counts
    assert counts["nonfinite"] == counts["skip"] == 1


@pytest.mark.parametrize("clip_val", [1e-3, 1e3])
def test_with_gradient_clip_val_the_tighter_clip_wins(tmp_path: Path, clip_val: float) -> None:
    probe, lr = _WeightsEveryStep(), 0.05
    _fit(TinyRegression(lr=lr, faults={40: "scale_grad"}), 41, tmp_path, [_guard(), probe], gradient_clip_val=clip_val)
    applied_norm = ((probe.weights[41] - probe.weights[40]).norm() / lr).item()
    (event,) = [e for e in _events(tmp_path) if e["anomaly"] == "spike"]
    assert applied_norm == pytest.approx(min(clip_val, event["clip_threshold"]), rel=1e-3)


class _FakeLossScale(Callback):
    """Drives the GradScaler's state: sets its scale at chosen optimizer steps (no GPU needed)."""

    def __init__(self, scales: dict[int, float]) -> None:
        self.scales = scales

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step in self.scales:
            trainer.precision_plugin.scaler._scale.fill_(self.scales[trainer.global_step])


def test_fp16_overflow_is_counted_and_left_to_the_scaler(tmp_path: Path, memory_logger: Any) -> None:
    guard = _guard()
    precision = MixedPrecision("16-mixed", "cpu")
    trainer = _fit(TinyRegression(faults={30: "nan_loss"}), 40, tmp_path, [guard], plugins=[precision],
                   logger=memory_logger)
    counts = guard.policy().counts
    assert counts.get("amp_overflow", 0) >= 1 and "skip" not in counts and "escalate" not in counts
    assert guard.level == 1
    assert dict(memory_logger.metrics["gradstab/amp_overflow"])[39] == counts["amp_overflow"]
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**16  # the scaler itself backed off


class _LossScales(Callback):
    """The GradScaler's scale after every optimizer step (a device read, outside the guard's hook)."""

    def __init__(self) -> None:
        self.after: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.after[trainer.global_step] = trainer.precision_plugin.scaler.get_scale()


def test_fp16_collapsed_loss_scale_is_reset_and_a_collapse_that_keeps_coming_back_escalates(tmp_path: Path) -> None:
    guard, probe, scales = _guard(), _WeightsEveryStep(), _LossScales()
    precision = MixedPrecision("16-mixed", "cpu")
    collapsing = dict.fromkeys(range(30, 42), 0.25)  # something keeps driving the scale below 1
    _fit(TinyRegression(), 42, tmp_path, [_FakeLossScale(collapsing), guard, probe, scales], plugins=[precision])
    collapse = [e for e in _events(tmp_path) if e["anomaly"] == "loss_scale_collapse"]
    assert collapse[0]["step"] == 31 and collapse[0]["actions"] == ["skip"] and collapse[0]["evidence"] == "loss scale"
    assert torch.equal(probe.weights[31], probe.weights[30])
    assert scales.after[31] == 2.0**16  # reset to the scaler's initial scale, not left to grow back for ages
    assert [e["rung"] for e in collapse[:6]] == ["skip"] * 4 + ["lr_backoff"] * 2  # it escalates


def test_persistent_nan_under_fp16_collapses_the_scale_again_and_again_and_reaches_stop_with_a_reason(
    tmp_path: Path,
) -> None:
    guard = _guard()
    precision = MixedPrecision("16-mixed", "cpu")
    faults = dict.fromkeys(range(30, 600), "nan_loss")
    trainer = _fit(TinyRegression(faults=faults), 600, tmp_path, [guard], plugins=[precision])
    assert trainer.global_step < 600 and guard.stop_reason is not None
    assert "loss_scale_collapse at level 6 (stop)" in guard.stop_reason
    assert guard.policy().counts["amp_overflow"] > 100  # overflows the scaler skipped on its own in between


def test_rollback_restores_the_grad_scaler_state_of_the_snapshot(tmp_path: Path) -> None:
    budgets = {"skip": 1, "lr_backoff": 1}
    guard, scales = _guard(config=PolicyConfig(budgets=budgets, snapshot_every=10)), _LossScales()
    precision = MixedPrecision("16-mixed", "cpu")
    # the scale set to 4.0, then collapsed three times: skip, back off, roll back (policy steps 32-34)
    fake = _FakeLossScale({30: 4.0, 31: 0.5, 32: 0.5, 33: 0.5})
    _fit(TinyRegression(), 40, tmp_path, [fake, guard, scales], plugins=[precision])
    rollback = next(e for e in _events(tmp_path) if "rollback" in e["actions"])
    assert rollback["step"] == 34 and guard.snapshot_step is not None and guard.snapshot_step < 30
    # the scale in use at the snapshot step (the scale after the step before it), not the 4.0 set since
    assert scales.after[34] == scales.after[guard.snapshot_step - 1] not in (4.0, 0.5)


def test_zero_gradient_phase_then_normal_gradients_trains_like_the_unguarded_run(tmp_path: Path) -> None:
    faults = dict.fromkeys(range(30), "zero_loss")  # a loss term switched on at step 30
    unguarded, guarded, guard = TinyRegression(faults=faults), TinyRegression(faults=faults), _guard()
    _fit(unguarded, 200, tmp_path / "unguarded", [])
    _fit(guarded, 200, tmp_path / "guarded", [guard])
    counts = guard.policy().counts
    assert counts["zero_gradient"] == 30 and "skip" not in counts and "escalate" not in counts
    assert guarded.full_loss() == pytest.approx(unguarded.full_loss(), rel=0.01)


class _NoLrOptimizer(torch.optim.Optimizer):
    """Plain gradient descent whose param groups name their step ``step_size``, not ``lr``."""

    def __init__(self, params: Any, step_size: float = 0.05) -> None:
        super().__init__(params, {"step_size": step_size})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    parameter.add_(parameter.grad, alpha=-group["step_size"])
        return loss


class _WithoutLr(TinyRegression):
    def configure_optimizers(self) -> Any:
        return _NoLrOptimizer(self.parameters())


def test_optimizer_without_lr_is_named_at_fit_start_and_the_backoff_rung_still_works(tmp_path: Path) -> None:
    budgets = {"clip": 1, "tight_clip": 1, "skip": 1}
    guard = _guard(config=PolicyConfig(budgets=budgets))
    faults = dict(CLIMB_FAULTS)  # reaches lr_backoff at the 4th fault
    with pytest.warns(UserWarning, match=r"optimizer 0 \(_NoLrOptimizer\) has param groups without a numeric 'lr'"):
        trainer = _fit(_WithoutLr(faults=faults), 60, tmp_path, [guard])
    assert trainer.global_step == 60
    climb = [e["rung"] for e in _events(tmp_path) if e["anomaly"] in ("spike", "nonfinite")]
    assert climb[3:5] == ["lr_backoff"] * 2
    assert all("lr" not in group for group in trainer.optimizers[0].param_groups)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"config": {"zscore_threshold": 0}}, r"`zscore_threshold` must be a number > 0, got 0"),
        ({"config": {"warmup_steps": 0}}, r"`warmup_steps` must be an int >= 1, got 0"),
        ({"max_rung": "panic"}, r"`max_rung` must be one of \['observe', 'clip', 'tight_clip'"),
        ({"config": {"backoff_factor": 1.5}}, r"`backoff_factor` must be a number in \(0, 1\), got 1.5"),
        ({"max_rung": "clip", "config": {"snapshot_every": 10}}, r"`snapshot_every` configures rung 'rollback'"),
        ({"log_every_n_steps": 0}, r"`log_every_n_steps` must be a positive int or None, got 0"),
        ({"config": {"loss_scale_floor": math.inf}}, r"`loss_scale_floor` must be a finite number .*got inf"),
        ({"config": {"zscore_threshold": math.nan}}, r"`zscore_threshold` must be a finite number .*got nan"),
        ({"max_norm": math.inf}, r"`max_norm` must be a finite number .*got inf"),
    ],
)
def test_guard_rejects_bad_arguments_naming_them(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExplosionGuard(**options)


def test_guard_reads_the_device_once_per_optimizer_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guard = _guard()
    host_reads: list[str] = []
    inside = [False]
    for method in ("tolist", "item", "__bool__", "__float__", "__int__", "numpy"):
        original = getattr(torch.Tensor, method)

        def counted(self: torch.Tensor, *args: Any, _original: Any = original, _name: str = method) -> Any:
            if inside[0]:
                host_reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, counted)
    hook = guard.on_before_optimizer_step

    def observed(*args: Any) -> None:
        inside[0] = True
        try:
            hook(*args)
        finally:
            inside[0] = False

    monkeypatch.setattr(guard, "on_before_optimizer_step", observed)
    _fit(TinyRegression(faults={30: "scale_grad", 35: "nan_loss"}), 40, tmp_path, [guard])
    assert host_reads == ["tolist"] * 40  # clip and skip steps included


class _TwoOptimizers(TinyRegression):
    """Manual optimization with one optimizer per half of the network; NaN only in the second's grads."""

    def __init__(self, nan_step: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.nan_step = nan_step

    def training_step(self, batch: Any, batch_idx: int) -> None:
        first, second = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        if batch_idx == self.nan_step:
            self.net[4].weight.grad.fill_(float("nan"))
        first.step()
        second.step()

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.SGD(self.net[:2].parameters(), lr=self.lr),
            torch.optim.SGD(self.net[2:].parameters(), lr=self.lr),
        )


def test_each_optimizer_has_its_own_policy_and_metrics(tmp_path: Path, memory_logger: Any) -> None:
    guard = _guard()
    _fit(_TwoOptimizers(nan_step=10), 40, tmp_path, [guard], logger=memory_logger)
    assert guard.policy(0).counts.get("skip", 0) == 0
    assert guard.policy(1).counts["skip"] == 1 and guard.policy(1).counts["nonfinite"] == 1
    assert guard.policy(0).state.steps == guard.policy(1).state.steps == 20  # two optimizer steps per batch
    assert dict(memory_logger.metrics["gradstab/opt1/skipped"])[10] == 1.0  # logged on the batch axis
    assert "gradstab/opt0/level" in memory_logger.metrics  # every optimizer scoped, as the monitor does


def test_compiled_module_is_guarded_like_the_eager_one(tmp_path: Path) -> None:
    faults = {30: "scale_grad", 35: "nan_loss"}
    eager, compiled = _guard(), _guard()
    _fit(TinyRegression(faults=faults), 40, tmp_path / "eager", [eager])
    _fit(torch.compile(TinyRegression(faults=faults), backend="eager"), 40, tmp_path / "compiled", [compiled])
    assert compiled.policy().counts == eager.policy().counts
    assert [e["actions"] for e in compiled.policy().events] == [e["actions"] for e in eager.policy().events]
    assert compiled.policy().counts["skip"] == 1 and compiled.policy().counts["clip"] >= 1


def test_tensorboard_logger_gets_the_gradient_stability_layout(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from lightning_gradstab.tensorboard import GUARD_CHARTS

    logger = TensorBoardLogger(str(tmp_path))
    _fit(TinyRegression(), 5, tmp_path, [_guard()], logger=logger)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    configs = events.Tensors("custom_scalars__config__")
    assert len(configs) == 1  # registered once, by the guard alone
    layout = layout_pb2.Layout.FromString(configs[0].tensor_proto.string_val[0])
    assert layout.category[0].title == "Gradient stability"
    assert set(GUARD_CHARTS) <= {chart.title for chart in layout.category[0].chart}


def test_snapshot_survives_a_restore_and_further_training() -> None:
    from lightning_gradstab.guard.tuple_snapshot import restore_training_state, snapshot_training_state

    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)

    def train_step() -> None:
        optimizer.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()

    train_step()
    snapshot = snapshot_training_state(model, [optimizer])
    frozen = json.dumps(str(snapshot))
    restore_training_state(model, [optimizer], snapshot)
    train_step()  # Adam updates its moments in place: they must not be the snapshot's tensors
    train_step()
    assert json.dumps(str(snapshot)) == frozen
    refreshed = snapshot_training_state(model, [optimizer], into=snapshot)
    assert refreshed[0]["weight"] is snapshot[0]["weight"]  # refreshed in place, no new allocation
    assert torch.equal(refreshed[0]["weight"], model.weight.detach())


def test_a_run_sigkilled_and_resumed_rolls_back_to_the_same_weights_as_the_uninterrupted_run(tmp_path: Path) -> None:
    import subprocess
    import sys

    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers.subprocess_env import REPO, child_env
    from tests.scripts import guard_resume

    script = REPO / "tests" / "scripts" / "guard_resume.py"
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "killed")], env=child_env(), timeout=200)
    assert killed.returncode == -9  # SIGKILL: no exception handler, no on_exception checkpoint
    runs = {}
    for name, ckpt in [("uninterrupted", None), ("resumed", tmp_path / "killed" / "checkpoints" / "last.ckpt")]:
        probe, guard = _WeightsEveryStep(), guard_resume.guard()
        trainer = quiet_trainer(
            max_steps=guard_resume.STEPS, default_root_dir=str(tmp_path / name),
            callbacks=[guard, ModelCheckpoint(dirpath=str(tmp_path / name / "ckpt")), probe], enable_checkpointing=True,
        )
        trainer.fit(TinyRegression(faults=guard_resume.FAULTS), regression_loader(), ckpt_path=ckpt and str(ckpt))
        runs[name] = (probe.weights, guard)
    (weights, guard), (resumed_weights, resumed_guard) = runs["uninterrupted"], runs["resumed"]
    rollback = next(e for e in guard.policy().events if "rollback" in e["actions"])
    assert rollback["step"] > guard_resume.KILL_STEP  # the rollback happens after the crash
    resumed_rollback = next(e for e in resumed_guard.policy().events if "rollback" in e["actions"])
    assert resumed_rollback["step"] == rollback["step"] and resumed_guard.snapshot_step == guard.snapshot_step
    assert guard.snapshot_step <= 50  # taken before the last checkpoint: only the checkpoint can carry it
    assert torch.equal(resumed_weights[rollback["step"]], weights[rollback["step"]])  # the same restored weights


def test_a_skipped_batch_that_comes_back_on_the_same_weights_is_trained_on_not_skipped_until_the_bound() -> None:
    torch.manual_seed(0)
    guard = ExplosionGuard(console_summary=False)
    trainer = quiet_trainer(max_steps=60, overfit_batches=1, callbacks=[guard], log_every_n_steps=1000)
    trainer.fit(OverfitOneBatch(), train_dataloaders=regression_loader())
    counts = guard.policies[0].state.counts
    # step 40 is skipped; step 41 sees the identical loss (the skip left the weights as they were): learned
    assert counts["loss_spike"] >= 1 and counts["repeated_batch"] >= 1
    assert counts["skip"] < 3 and "skip_bound" not in counts
