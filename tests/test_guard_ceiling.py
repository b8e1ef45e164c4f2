"""The guard's absolute norm ceiling: ``max_norm="auto"`` is 1.0 for optimizers whose step ignores the gradient's
scale (Adam and its relatives) and nothing for SGD; a number applies to every optimizer, ``None`` to none."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_gradstab import ExplosionGuard
from lightning_gradstab.callbacks._optimizers import is_scale_invariant
from lightning_gradstab.guard.config import SCALE_INVARIANT_MAX_NORM, PolicyConfig
from lightning_gradstab.guard.detect import Observation
from lightning_gradstab.guard.ladder import ExplosionPolicy
from tests.helpers.models import regression_data, tanh_mlp
from tests.helpers.trainers import quiet_trainer

STEPS = 8


class _LoudRegressor(pl.LightningModule):
    """Regression on targets x10: a healthy run whose gradient norm is well above 1 at every step."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = tanh_mlp()
        self.optimizer_name = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), 10.0 * y)

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _NormsSeenByTheOptimizer(Callback):
    """The total gradient norm the optimizer steps with (after every other callback's hook ran)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def _fit(
    optimizer: str, tmp_path: Path, guard: ExplosionGuard | None = None
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The final weights and the norm of every step as the optimizer saw it, with ``guard`` (or none)."""
    model, seen = _LoudRegressor(optimizer), _NormsSeenByTheOptimizer()
    callbacks = [seen] if guard is None else [guard, seen]
    quiet_trainer(max_steps=STEPS, callbacks=callbacks, default_root_dir=str(tmp_path)).fit(model, regression_data())
    return {k: v.clone() for k, v in model.state_dict().items()}, seen.norms


def _guard(**options) -> ExplosionGuard:
    return ExplosionGuard(console_summary=False, **options)


def test_adamw_steps_are_clipped_to_norm_one_by_default(tmp_path: Path) -> None:
    _, raw_norms = _fit("adamw", tmp_path / "raw")
    assert min(raw_norms) > 2.0  # every step would exceed the ceiling
    guard = _guard()
    _, norms = _fit("adamw", tmp_path / "guarded", guard)
    assert norms == pytest.approx([SCALE_INVARIANT_MAX_NORM] * STEPS, rel=1e-5)
    assert guard.policy().counts["max_norm"] == STEPS
    assert guard.policy().level == 1  # a ceiling is not an anomaly: nothing escalates


def test_sgd_is_not_clipped_by_the_automatic_ceiling_and_trains_bit_identically(tmp_path: Path) -> None:
    reference, raw_norms = _fit("sgd", tmp_path / "raw")
    assert min(raw_norms) > 2.0
    guard = _guard()
    weights, _ = _fit("sgd", tmp_path / "guarded", guard)
    assert "max_norm" not in guard.policy().counts
    for name, value in reference.items():
        assert torch.equal(weights[name], value), name


def test_no_ceiling_leaves_adamw_bit_identical(tmp_path: Path) -> None:
    reference, _ = _fit("adamw", tmp_path / "raw")
    guard = _guard(max_norm=None)
    weights, _ = _fit("adamw", tmp_path / "guarded", guard)
    assert guard.policy().counts == {}
    for name, value in reference.items():
        assert torch.equal(weights[name], value), name


def test_an_explicit_ceiling_applies_to_sgd_too(tmp_path: Path) -> None:
    guard = _guard(max_norm=2.0)
    _, norms = _fit("sgd", tmp_path / "guarded", guard)
    assert norms == pytest.approx([2.0] * STEPS, rel=1e-5)
    assert guard.policy().counts["max_norm"] == STEPS


class _LionLike(torch.optim.Optimizer):
    """A third-party sign optimizer with Adam-style ``betas`` (as Lion and LAMB have)."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        super().__init__(params, {"lr": lr, "betas": betas})


@pytest.mark.parametrize(
    ("factory", "invariant"),
    [
        (lambda p: torch.optim.Adam(p), True),
        (lambda p: torch.optim.AdamW(p), True),
        (lambda p: torch.optim.RMSprop(p), True),
        (lambda p: torch.optim.Adagrad(p), True),
        (lambda p: torch.optim.NAdam(p), True),
        (lambda p: _LionLike(p), True),
        (lambda p: torch.optim.SGD(p, lr=0.1), False),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), False),
        (lambda p: torch.optim.LBFGS(p), False),
    ],
    ids=["adam", "adamw", "rmsprop", "adagrad", "nadam", "betas", "sgd", "nesterov", "lbfgs"],
)
def test_optimizers_whose_step_ignores_the_gradient_scale_are_recognised(factory, invariant: bool) -> None:
    assert is_scale_invariant(factory(nn.Linear(2, 2).parameters())) is invariant


def test_policy_ceiling_follows_the_observation_only_in_auto_mode() -> None:
    def first_threshold(max_norm: object, observation: Observation) -> float:
        return ExplosionPolicy(PolicyConfig(max_norm=max_norm)).step(observation).clip_threshold

    adaptive, plain = Observation(5.0, scale_invariant=True), Observation(5.0)
    assert first_threshold("auto", adaptive) == SCALE_INVARIANT_MAX_NORM
    assert first_threshold("auto", plain) == float("inf")
    assert first_threshold(3.0, plain) == 3.0
    assert first_threshold(None, adaptive) == float("inf")


@pytest.mark.parametrize("value", ["always", -1.0, 0.0, float("inf")])
def test_bad_max_norm_is_rejected_naming_the_argument(value: object) -> None:
    with pytest.raises(ValueError, match="max_norm"):
        ExplosionGuard(max_norm=value)  # type: ignore[arg-type]
