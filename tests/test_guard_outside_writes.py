"""Weights changed between optimizer steps by the user (a reset, pruning, a rewind, a load) are the user's: the
guard starts afresh from them and never rolls back past them (:mod:`lightning_gradstab.callbacks._guard_writes`,
:meth:`ExplosionPolicy.weights_changed`)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from benchmarks.divergence_tasks import _digit_batches, mlp
from benchmarks.healthy_tasks import HealthyBuilt, MetricModule, _adam, error_rate
from lightning_gradstab import ExplosionGuard
from lightning_gradstab.callbacks._guard_writes import OutsideWrites
from lightning_gradstab.guard.config import PolicyConfig
from lightning_gradstab.guard.detect import Observation
from lightning_gradstab.guard.ladder import ExplosionPolicy
from tests.helpers.trainers import quiet_trainer

# ------------------------------------------------------------------------------------------------------------------
# what counts as a write from outside the optimizer
# ------------------------------------------------------------------------------------------------------------------


def _stepped(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.ones(3, 4)).square().sum().backward()
    optimizer.step()


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
def test_an_optimizer_step_is_not_a_write_from_outside_and_a_reset_an_init_a_load_and_a_no_grad_edit_are(
    optimizer_class: type[torch.optim.Optimizer],
) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    writes = OutsideWrites()
    writes.watch([optimizer])
    assert not writes.changed()
    _stepped(model, optimizer)  # AdamW writes each weight twice (decay, then the step): still the optimizer's
    assert not writes.changed()
    edits = [
        lambda: model[2].reset_parameters(),
        lambda: nn.init.zeros_(model[0].bias),
        lambda: model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}),
        lambda: model[0].weight.mul_(0.5),
        lambda: setattr(model[0].bias, "data", torch.zeros(4)),  # another storage: how ModelPruning rewinds
    ]
    for edit in edits:
        with torch.no_grad():
            edit()
        assert writes.changed()
        assert not writes.changed()  # taken in: the same write is told once
        _stepped(model, optimizer)
        assert not writes.changed()


def test_a_write_of_the_guards_own_is_taken_in_and_a_weight_shared_by_two_optimizers_is_counted_once() -> None:
    shared = nn.Linear(2, 2)
    first = torch.optim.SGD(shared.parameters(), lr=0.1)
    second = torch.optim.SGD(shared.parameters(), lr=0.1)
    writes = OutsideWrites()
    writes.watch([first, second])
    assert len(writes._parameters) == 2
    with torch.no_grad():
        shared.weight.add_(1.0)  # e.g. a rollback's restore
    writes.resync()
    assert not writes.changed()
    for optimizer in (first, second):  # either optimizer's step is an optimizer's
        shared(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        assert not writes.changed()
    writes.close()
    with torch.no_grad():
        shared.weight.add_(1.0)
    assert not writes.changed()  # closed: nothing watched, nothing told


def test_the_writes_between_the_closure_evaluations_of_one_step_are_the_optimizers():
    """L-BFGS's line search moves the weights between evaluations of its closure, and Lightning runs
    ``on_before_optimizer_step`` (where the guard checks) after each: only the first evaluation of a step is checked."""
    model = nn.Linear(4, 1)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=5, line_search_fn="strong_wolfe")
    writes = OutsideWrites()
    writes.watch([optimizer])
    seen: list[bool] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (model(torch.randn(8, 4, generator=torch.Generator().manual_seed(0))) - 1).square().mean()
        loss.backward()
        seen.append(writes.changed())  # where Lightning calls on_before_optimizer_step
        return loss

    optimizer.step(closure)
    assert len(seen) > 2 and not any(seen)
    with torch.no_grad():
        model.bias.zero_()
    first = len(seen)
    optimizer.step(closure)
    assert seen[first] and not any(seen[first + 1 :])  # the write before this step, at its first evaluation only


def test_a_sparse_weight_is_watched_by_its_counter_alone() -> None:
    sparse = nn.Parameter(torch.eye(3).to_sparse())  # no single storage address to read
    dense = nn.Parameter(torch.zeros(2))
    writes = OutsideWrites()
    writes.watch([torch.optim.SGD([sparse, dense], lr=0.1)])
    assert writes._addressed == [dense]
    assert not writes.changed()
    with torch.no_grad():
        sparse.mul_(2.0)
    assert writes.changed()


# ------------------------------------------------------------------------------------------------------------------
# what the policy does with it
# ------------------------------------------------------------------------------------------------------------------


def _trained_policy(steps: int = 60) -> ExplosionPolicy:
    policy = ExplosionPolicy(PolicyConfig())
    for step in range(steps):
        policy.step(Observation(1.0 + 0.1 * math.sin(step), loss=0.1 + 0.01 * math.cos(step)))
    return policy


def test_a_change_from_outside_restarts_every_statistic_and_drops_the_snapshot_but_keeps_the_ladder() -> None:
    policy = _trained_policy()
    policy.state.level, policy.state.lr_scale = 3, 0.5  # evidence about the learning rate: not the weights'
    assert policy.state.has_snapshot and policy.statistics.warmed_up
    assert policy.weights_changed()
    assert policy.counts["weights_changed"] == 1
    assert not policy.state.has_snapshot and policy.snapshots.statistics_at_snapshot is None
    assert policy.statistics.count == policy.loss_statistics.count == policy.log_loss_statistics.count == 0
    assert policy.loss_trend.count == 0 and policy.state.first_loss is None
    assert (policy.level, policy.lr_scale) == (3, 0.5)
    # the jump of the loss after a reset is the new level the warm-up learns, not a spike to skip
    decision = policy.step(Observation(3.0, loss=2.3))
    assert not decision.skip and decision.anomaly is None and decision.snapshot  # the new weights are the snapshot


def test_a_write_that_comes_back_within_the_warm_up_is_how_the_run_steps_and_is_learned_as_any_step() -> None:
    policy = _trained_policy()
    assert policy.weights_changed()
    for _ in range(3):
        policy.step(Observation(1.0, loss=0.1))
        assert not policy.weights_changed()  # a projection after every step (WGAN's weight clipping)
    assert policy.counts["weights_changed"] == 1 and policy.statistics.count == 3
    for _ in range(policy.config.warmup_steps):
        policy.step(Observation(1.0, loss=0.1))
    assert policy.weights_changed()  # an isolated write again


def test_the_step_of_the_last_write_survives_a_checkpoint() -> None:
    policy = _trained_policy()
    policy.weights_changed()
    resumed = ExplosionPolicy(PolicyConfig())
    resumed.load_state_dict(policy.state_dict())
    assert resumed.state.outside_write_step == policy.state.outside_write_step == 60
    assert not resumed.weights_changed()  # within the warm-up of the write before the checkpoint


# ------------------------------------------------------------------------------------------------------------------
# a fit whose head is reset mid-run (Nikishin et al. 2022)
# ------------------------------------------------------------------------------------------------------------------

RESET_AT, STEPS = 150, 200


class _HeadReset(MetricModule):
    """The benchmark's digit MLP under Adam (lr 1e-3); its last layer is re-initialised before step ``RESET_AT``,
    when the loss is near its floor: the loss jumps back to the chance level."""

    def __init__(self) -> None:
        super().__init__(mlp(128, 2, nn.ReLU), "ce", _adam(1e-3), error_rate)
        self.reset_done = False

    def on_train_batch_start(self, batch: object, idx: int) -> None:
        if self.global_step == RESET_AT and not self.reset_done:
            self.net[-1].reset_parameters()
            self.reset_done = True


def _fit_with_reset() -> ExplosionGuard:
    train, evals = _digit_batches(0, STEPS)
    built = HealthyBuilt(_HeadReset(), train, evals)
    torch.manual_seed(0)
    guard = ExplosionGuard(console_summary=False)
    quiet_trainer(max_steps=STEPS, callbacks=[guard]).fit(built.module, built.train_loader())
    return guard


def test_a_head_reset_mid_run_is_the_users_the_guard_restarts_from_it_and_never_rolls_back_past_it() -> None:
    counts = _fit_with_reset().policy().counts
    assert counts.get("weights_changed") == 1
    for costly in ("skip", "rollback", "divergence", "loss_spike", "escalate"):
        assert costly not in counts, counts


def test_without_telling_the_reset_from_damage_the_guard_would_roll_the_reset_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the test above guards against: the same fit with the writes never seen."""
    monkeypatch.setattr(OutsideWrites, "changed", lambda self: False)
    guard = _fit_with_reset()
    counts = guard.policy().counts
    assert "weights_changed" not in counts
    assert counts.get("divergence", 0) >= 1 and counts.get("rollback", 0) >= 1, counts


def test_lightnings_lottery_ticket_rewind_through_data_is_seen_as_the_users() -> None:
    """``ModelPruning(use_lottery_ticket_hypothesis=True)`` rewinds the surviving weights to their initial values
    by pointing each parameter at another storage (``p.data = ...``): no version counter moves, the address does."""
    train, evals = _digit_batches(0, 60)
    module = MetricModule(mlp(128, 2, nn.ReLU), "ce", _adam(1e-3), error_rate)
    built = HealthyBuilt(module, train, evals)
    hidden = [(layer, "weight") for layer in module.net.modules() if isinstance(layer, nn.Linear)][:-1]
    pruning = ModelPruning(
        "l1_unstructured", amount=0.5, use_lottery_ticket_hypothesis=True, parameters_to_prune=hidden, verbose=0
    )
    torch.manual_seed(0)
    guard = ExplosionGuard(console_summary=False)
    quiet_trainer(max_epochs=2, callbacks=[pruning, guard]).fit(module, built.train_loader())
    assert guard.policy().counts.get("weights_changed") == 1  # the rewind after the first epoch
    assert guard.policy().state.outside_write_step == 60


def test_a_guard_reused_for_a_second_fit_watches_the_new_optimizers_from_their_first_step() -> None:
    """A write between two fits (here a reset) belongs to no fit's steps: the second fit starts clean anyway."""
    train, evals = _digit_batches(0, 30)
    module = MetricModule(mlp(32, 1, nn.ReLU), "ce", _adam(1e-3), error_rate)
    built = HealthyBuilt(module, train, evals)
    guard = ExplosionGuard(console_summary=False)
    for _ in range(2):
        quiet_trainer(max_steps=30, callbacks=[guard]).fit(module, built.train_loader())
        assert "weights_changed" not in guard.policy().counts
        assert guard._outside_writes._hooks == []  # the fit's hooks are gone with it
        module.net[-1].reset_parameters()
