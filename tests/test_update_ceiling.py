"""The relative-update ceiling: an optimizer step moves no weight matrix by more than a tenth of its RMS.

Specification (``lightning_gradstab.update_ceiling`` and the guard's ``max_relative_update``):

- a tensor whose step has ``RMS(step) / max(RMS(w_old), 1 / sqrt(fan_in)) > ceiling`` ends exactly at the ceiling,
  in the step's direction; every other tensor keeps its step bit for bit, and vectors (biases, gains) are never
  bounded; a matrix initialised below the variance-preserving scale is measured against that scale;
- the guard applies it to Adam-family optimizers only, measures the first step, every step while the last was
  within half the ceiling, after a learning-rate rise and every ``UPDATE_CEILING_EVERY`` steps, and reads the
  outcome with the next step's reduction (no host read of its own);
- a healthy run never reaches it (bit-identical to the ceiling off); an AdamW run at a learning rate far too high
  for its weights' scale is held at it.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_gradstab import ExplosionGuard, RelativeUpdateCeiling
from lightning_gradstab.callbacks._guard_update import (
    CHECK_ROWS_EVERY,
    NEAR,
    UPDATE_CEILING_EVERY,
    GuardUpdateCeiling,
)
from tests.helpers.trainers import quiet_trainer


def _rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


def _step(weights: list[torch.Tensor], steps: list[torch.Tensor], ceiling: RelativeUpdateCeiling) -> torch.Tensor:
    ceiling.begin(weights)
    with torch.no_grad():
        for w, s in zip(weights, steps, strict=True):
            w.add_(s)
    outcome = ceiling.end()
    assert outcome is not None
    return outcome


def test_a_step_above_the_ceiling_lands_on_it_in_its_own_direction_and_the_others_keep_theirs_bit_for_bit() -> None:
    torch.manual_seed(0)
    big, small, bias = torch.randn(8, 4), torch.randn(3, 5), torch.zeros(4)  # RMS ~1 > 1 / sqrt(fan_in)
    before = [big.clone(), small.clone(), bias.clone()]
    big_step, small_step, bias_step = 0.5 * torch.randn(8, 4), 0.01 * torch.randn(3, 5), torch.ones(4)
    outcome = _step([big, small, bias], [big_step, small_step, bias_step], RelativeUpdateCeiling(0.1))

    moved = big - before[0]
    assert _rms(moved) / _rms(before[0]) == pytest.approx(0.1, rel=1e-5)  # exactly on the ceiling
    cosine = torch.nn.functional.cosine_similarity(moved.reshape(-1), big_step.reshape(-1), dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-6)  # shrunk, not turned
    assert torch.equal(small, before[1] + small_step)  # below the ceiling: the optimizer's step, bit for bit
    assert torch.equal(bias, before[2] + bias_step)  # a vector is never bounded
    bounded, largest = outcome.tolist()
    assert bounded == 1
    assert largest == pytest.approx(_rms(big_step) / _rms(before[0]), rel=1e-5)


def test_a_small_or_zero_matrix_is_measured_against_a_variance_preserving_inits_scale() -> None:
    """fan_in 64: the scale is 1/8, so a step of RMS 0.01 on a matrix of RMS 0.02 (GPT-2's init) passes untouched
    and a zero matrix moves by at most 0.1 / 8; with Adafactor's absolute floor it would be 0.1 * 1e-3."""
    small = 0.02 * torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    before = small.clone()
    step = torch.full((16, 64), 0.01)
    outcome = _step([small], [step], RelativeUpdateCeiling(0.1))
    assert torch.equal(small, before + step) and outcome[0].item() == 0
    zero = torch.zeros(16, 64)
    _step([zero], [torch.full((16, 64), 1.0)], RelativeUpdateCeiling(0.1))
    assert _rms(zero) == pytest.approx(0.1 / 8, rel=1e-5)
    zero = torch.zeros(6, 6)
    _step([zero], [torch.full((6, 6), 0.01)], RelativeUpdateCeiling(0.1, floor=1e-3))
    assert _rms(zero) == pytest.approx(0.1 * 1e-3, rel=1e-5)
    with pytest.raises(ValueError, match="floor"):
        RelativeUpdateCeiling(0.1, floor="rms")  # type: ignore[arg-type]


def test_a_check_of_sampled_rows_estimates_the_ratio_and_bounds_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    weights, step = torch.randn(64, 32, generator=g), 0.3 * torch.randn(64, 32, generator=g)
    before = weights.clone()
    ceiling = RelativeUpdateCeiling(0.1)
    ceiling.begin([weights], sample_every=8)
    weights.add_(step)
    bounded, largest = ceiling.end().tolist()
    assert bounded == 0 and torch.equal(weights, before + step)  # a check changes nothing
    assert largest == pytest.approx(_rms(step) / _rms(before), rel=0.2)  # 8 of 64 rows: an estimate
    assert largest == pytest.approx(_rms(step[::8]) / _rms(before[::8]), rel=1e-5)
    with pytest.raises(ValueError, match="sample_every"):
        ceiling.begin([weights], sample_every=0)


def test_a_non_finite_step_is_neither_bounded_nor_counted_and_stays_non_finite() -> None:
    weights, other = torch.ones(2, 2), torch.ones(2, 2)
    outcome = _step([weights, other], [torch.tensor([[math.inf, 0.0], [0.0, 0.0]]), torch.zeros(2, 2)],
                    RelativeUpdateCeiling(0.1))
    assert outcome.tolist() == [0.0, 0.0]
    assert not weights.isfinite().all()  # for the guard's non-finite rule at the next step
    assert torch.equal(other, torch.ones(2, 2))


def test_complex_and_float64_matrices_are_bounded_like_float32() -> None:
    for dtype in (torch.float64, torch.complex64):
        weights = torch.ones(4, 4, dtype=dtype)
        before = weights.clone()
        _step([weights], [torch.full((4, 4), 2.0, dtype=dtype)], RelativeUpdateCeiling(0.1))
        assert (weights - before).abs().pow(2).mean().sqrt().item() == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("value", [0.0, -0.1, math.nan, math.inf, "0.1", True])
def test_bad_ceilings_are_refused_naming_the_argument(value: object) -> None:
    with pytest.raises((ValueError, TypeError), match="max_relative_update"):
        RelativeUpdateCeiling(value)  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError), match="max_relative_update"):
        ExplosionGuard(max_relative_update=value)  # type: ignore[arg-type]


class _Optimizer:
    def __init__(self) -> None:
        self.param_groups = [{"params": [], "lr": 1e-3}]


def test_the_schedule_measures_the_first_step_near_steps_lr_rises_and_every_hundredth() -> None:
    ceiling = GuardUpdateCeiling(0.1)
    plan = []
    # first step: measured; its outcome comes back with the next step's reduction
    ceiling.read(0, 0.0, 0.0, lr=1e-3)
    plan.append(ceiling.measuring(0))
    ceiling.read(0, 0.0, 0.01, lr=1e-3)  # far below the ceiling: not measured again for a while
    plan.append(ceiling.measuring(0))
    assert plan == [True, False]
    waits = 0
    while not ceiling.measuring(0):
        ceiling.read(0, 0.0, 0.0, lr=1e-3)
        waits += 1
    assert waits == UPDATE_CEILING_EVERY - 1
    assert ceiling._measuring[0] == CHECK_ROWS_EVERY  # far from the ceiling: a check of sampled rows, not in full
    ceiling.read(0, 0.0, 0.01, lr=1e-3)
    assert not ceiling.measuring(0)
    # the learning rate rises until the step it predicts is within half of the ceiling: measured at once
    ceiling.read(0, 0.0, 0.0, lr=1e-3 * NEAR * 0.1 / 0.01 * 1.01)
    assert ceiling.measuring(0)
    ceiling.read(0, 1.0, 0.2, lr=1e-3)  # bounded: every following step is measured
    assert ceiling.measuring(0)
    assert ceiling.read(0, 0.0, 0.07, lr=1e-3) == 0 and ceiling.measuring(0)  # within half: still measured
    ceiling.read(0, 0.0, 0.01, lr=1e-3)
    assert not ceiling.measuring(0)


def test_the_ceiling_applies_to_adam_family_optimizers_only() -> None:
    weights = [nn.Parameter(torch.ones(2, 2))]
    assert GuardUpdateCeiling.applies_to(torch.optim.AdamW(weights))
    assert GuardUpdateCeiling.applies_to(torch.optim.RMSprop(weights))
    assert not GuardUpdateCeiling.applies_to(torch.optim.SGD(weights, lr=0.1, momentum=0.9))


class _Stack(pl.LightningModule):
    """A small MLP on a fixed regression batch; ``init_std`` sets the matrices' scale, ``lr`` AdamW's rate."""

    def __init__(self, lr: float, init_std: float | None = None, optimizer: str = "adamw") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
        if init_std is not None:
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=init_std)
        self.lr, self.optimizer_name = lr, optimizer
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 16, generator=g)
        self.y = torch.sin(self.x.sum(1, keepdim=True))

    def training_step(self, batch: torch.Tensor, idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(self.x), self.y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class _RelativeSteps(pl.Callback):
    """The largest RMS(step) / max(RMS(weights), 1 / sqrt(fan_in)) over the matrices, per optimizer step (after
    every callback)."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.ratios: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, idx: int) -> None:
        self.before = [p.detach().clone() for p in pl_module.parameters() if p.ndim >= 2]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, idx) -> None:
        after = [p.detach() for p in pl_module.parameters() if p.ndim >= 2]
        self.ratios.append(max(
            _rms(a - b) / max(_rms(b), b[0].numel() ** -0.5) for a, b in zip(after, self.before, strict=True)
        ))


def _fit(module: pl.LightningModule, guard: ExplosionGuard, steps: int) -> _RelativeSteps:
    steps_seen = _RelativeSteps()
    loader = torch.utils.data.DataLoader(torch.zeros(steps, 1), batch_size=1)
    quiet_trainer(max_steps=steps, callbacks=[guard, steps_seen]).fit(module, loader)
    return steps_seen


def test_adamw_at_a_rate_far_above_its_weights_scale_is_held_at_the_ceiling() -> None:
    """lr 0.2 on matrices of fan-in 16 and 32: Adam's first step is lr * sign(g), 0.8-1.1 of a variance-preserving
    init's scale (1/4 and 0.18)."""
    free = _fit(_Stack(lr=0.2), ExplosionGuard(max_relative_update=None, console_summary=False), 40)
    assert free.ratios[0] > 0.5
    guard = ExplosionGuard(console_summary=False)
    held = _fit(_Stack(lr=0.2), guard, 40)
    # measured (Intel Xeon, 1 and 2 threads, and 3 runs with weights x (1 + 1e-6 N(0, 1))): first free step 1.13,
    # largest held step 0.10000, 19 steps bounded
    assert max(held.ratios) <= 0.1 * (1 + 1e-4)  # every step is measured while it is near the ceiling
    assert guard.policy().counts["relative_update"] >= 10


def test_a_healthy_adamw_run_and_any_sgd_run_are_bit_identical_with_the_ceiling_off() -> None:
    for lr, optimizer in ((1e-3, "adamw"), (0.5, "sgd")):
        on, off = _Stack(lr=lr, optimizer=optimizer), _Stack(lr=lr, optimizer=optimizer)
        guard = ExplosionGuard(console_summary=False)
        _fit(on, guard, 30)
        _fit(off, ExplosionGuard(max_relative_update=None, console_summary=False), 30)
        for a, b in zip(on.parameters(), off.parameters(), strict=True):
            assert torch.equal(a, b)
        assert "relative_update" not in guard.policy().counts


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_dtensor_shards_are_bounded_as_the_whole_tensors_are(tmp_path) -> None:
    """FSDP2's Shard(0), a tensor-parallel Shard(1), a Replicate and HSDP's (Replicate, Shard(0)) on 2x1 and 1x2
    meshes, on 2 gloo ranks: the same weights after the bounded step and the same outcome as one process with whole
    tensors (whole-tensor norms, replicas counted once, one collective)."""
    import json
    import subprocess
    import sys

    from tests.helpers.subprocess_env import REPO, child_env

    done = subprocess.run(
        [sys.executable, str(REPO / "tests/scripts/update_ceiling_sharded.py"), str(tmp_path)],
        env=child_env(TEST_PORT="29537"), capture_output=True, text=True, timeout=200,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    reference = json.loads((tmp_path / "reference.json").read_text())
    assert reference["outcome"][0] == 4  # four of the five tensors went over the ceiling
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["outcome"] == pytest.approx(reference["outcome"], rel=1e-5), rank
        for got, want in zip(result["weights"], reference["weights"], strict=True):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), rank


def test_a_copy_whose_step_never_ran_is_dropped_and_the_next_step_is_measured() -> None:
    """A GradScaler skips ``optimizer.step()`` on an fp16 overflow: the post-hook never runs, so the copy taken
    before it is dropped at the next step and no stale outcome reaches the reduction."""
    ceiling = GuardUpdateCeiling(0.1)
    weights = nn.Parameter(torch.ones(4, 4))
    weights.grad = torch.ones(4, 4)
    optimizer = torch.optim.Adam([weights], lr=1.0)
    ceiling.read(0, 0.0, 0.0, lr=1.0)  # the first step: measured
    ceiling.begin(0, optimizer)  # copied; the optimizer does not step (overflow)
    assert ceiling.outcome(0) == (0.0, 0.0)
    ceiling.read(0, 0.0, 0.0, lr=1.0)
    assert ceiling.measuring(0)  # never measured yet: measured again
    ceiling.begin(0, optimizer)
    optimizer.step()  # this one runs: Adam's first step moves every weight by lr * sign(g) = 1
    bounded, largest = ceiling.outcome(0)
    assert float(bounded) == 1 and float(largest) == pytest.approx(1.0)
    assert _rms(weights.detach() - 1.0) == pytest.approx(0.1, rel=1e-5)
    ceiling.close()


def test_under_fsdp1_the_ceiling_is_off_and_says_so() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    guard = ExplosionGuard(console_summary=False)
    adam = torch.optim.Adam([nn.Parameter(torch.ones(2, 2))])
    with pytest.warns(UserWarning, match="relative-update ceiling is off under FSDPStrategy"):
        guard._attach_update_ceiling(SimpleNamespace(strategy=FSDPStrategy(), optimizers=[adam]))
    assert guard._update_ceiling is None


class _AdamAndSgd(pl.LightningModule):
    """Two models stepped by hand, one by AdamW at a rate far above its weights' scale, one by plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.x = torch.randn(32, 16)

    def training_step(self, batch: torch.Tensor, idx: int) -> None:
        adam, sgd = self.optimizers()
        for optimizer, layer in ((adam, self.a), (sgd, self.b)):
            optimizer.zero_grad()
            self.manual_backward(layer(self.x).square().mean())
            optimizer.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.AdamW(self.a.parameters(), lr=0.5), torch.optim.SGD(self.b.parameters(), lr=0.5)]


def test_manual_optimization_bounds_the_adam_steps_and_leaves_the_sgd_ones_alone() -> None:
    guard = ExplosionGuard(console_summary=False)
    module = _AdamAndSgd()
    reference = _AdamAndSgd()
    loader = torch.utils.data.DataLoader(torch.zeros(10, 1), batch_size=1)
    quiet_trainer(max_steps=20, callbacks=[guard]).fit(module, loader)
    quiet_trainer(max_steps=20, callbacks=[ExplosionGuard(console_summary=False, max_relative_update=None)]).fit(
        reference, loader
    )
    assert guard.policy(0).counts["relative_update"] >= 3
    assert "relative_update" not in guard.policy(1).counts
    assert torch.equal(module.b.weight, reference.b.weight)  # the SGD model: bit for bit the run without it
    assert not torch.equal(module.a.weight, reference.a.weight)


def test_what_the_ceiling_did_is_logged_counted_and_advised(memory_logger) -> None:
    guard = ExplosionGuard(console_summary=False)
    loader = torch.utils.data.DataLoader(torch.zeros(20, 1), batch_size=1)
    quiet_trainer(max_steps=20, callbacks=[guard], logger=memory_logger).fit(_Stack(lr=0.2), loader)
    logged = dict(memory_logger.metrics["gradstab/relative_update_max"])
    assert logged[1] > 0.5  # the first step's ratio before it was shrunk, read with the second step's numbers
    summary = guard.summary()["optimizers"]["0"]
    assert summary["counts"]["relative_update"] >= 10
    assert any("max_relative_update" in line and "warm-up" in line for line in summary["advice"])
