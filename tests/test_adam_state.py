"""Adam-state evidence: the update Adam is about to apply, outlier coordinates and second-moment decay,
checked against float64 references and constructed cases, with no host sync."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_gradstab import GradNormMonitor
from lightning_gradstab.adam_state import OUTLIER_THRESHOLD, AdamStateTracker
from lightning_gradstab.stats import ParameterLayout, compute_gradient_stats
from tests.helpers.models import TinyRegressor
from tests.helpers.trainers import quiet_trainer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def _backward(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(16, 4, dtype=torch.float64, generator=generator)).square().mean().backward()


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adam_l2_amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, amsgrad=True),
    "adam_single_tensor_maximize": lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False, maximize=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_rms_equals_the_parameter_change_of_the_step_that_follows(name):
    model = _model()
    optimizer = OPTIMIZERS[name](model.parameters())
    layout = ParameterLayout.from_module(model, optimizer)
    tracker = AdamStateTracker(optimizer)
    for step in range(4):
        _backward(model, step)
        evidence = tracker.compute(compute_gradient_stats(layout))
        assert (evidence is None) == (step == 0)  # no state before Adam's first step
        assert step > 0 or len(optimizer.state) == 0  # and looking created none
        before = [p.detach().clone() for p in layout.parameters]
        optimizer.step()
        if evidence is None:
            continue
        group = optimizer.param_groups[0]
        decoupled = group["decoupled_weight_decay"]
        shrink = 1 - group["lr"] * group["weight_decay"] if decoupled else 1.0  # AdamW's decay, taken out
        reference = torch.stack(
            [(p.detach() - b * shrink).square().mean().sqrt() for p, b in zip(layout.parameters, before, strict=True)]
        )
        torch.testing.assert_close(evidence.update_rms, reference, rtol=1e-9, atol=1e-15)


def test_the_outlier_fraction_counts_the_coordinates_far_outside_their_second_moment():
    parameter = nn.Parameter(torch.zeros(100, dtype=torch.float64))
    optimizer = torch.optim.Adam([parameter], lr=0.1, betas=(0.9, 0.99))
    layout = ParameterLayout(("w",), (parameter,))
    parameter.grad = torch.ones(100, dtype=torch.float64)
    optimizer.step()  # v_hat = 1 everywhere
    grad = torch.ones(100, dtype=torch.float64)
    grad[:7] = math.sqrt(OUTLIER_THRESHOLD) * 1.01  # just outside k * v_hat
    grad[7:10] = math.sqrt(OUTLIER_THRESHOLD) * 0.99  # just inside
    parameter.grad = grad
    evidence = AdamStateTracker(optimizer).compute(compute_gradient_stats(layout))
    assert evidence.outlier_fraction.tolist() == [0.07]
    assert evidence.total_outlier_fraction().item() == pytest.approx(0.07)


def test_second_moment_decay_reads_vanished_gradients_as_a_recent_ratio_near_zero():
    parameter = nn.Parameter(torch.zeros(10, dtype=torch.float64))
    beta2 = 0.9
    optimizer = torch.optim.Adam([parameter], lr=0.1, betas=(0.5, beta2))
    layout = ParameterLayout(("w",), (parameter,))
    tracker = AdamStateTracker(optimizer)
    for _ in range(30):  # a steady gradient of 1: v_hat = 1
        parameter.grad = torch.ones(10, dtype=torch.float64)
        optimizer.step()
    parameter.grad = torch.ones(10, dtype=torch.float64)
    first = tracker.compute(compute_gradient_stats(layout))
    assert math.isnan(first.recent_grad_sq_ratio.item())  # nothing to compare with yet
    optimizer.step()
    for _ in range(4):  # the gradient shrinks 100x: v decays at rate beta2 per step, decoupled from g^2
        parameter.grad = torch.full((10,), 0.01, dtype=torch.float64)
        optimizer.step()
    parameter.grad = torch.full((10,), 0.01, dtype=torch.float64)
    second = tracker.compute(compute_gradient_stats(layout))
    # over the 5 steps between the two evidence steps the mean g^2 was 1e-4, v_hat then was ~1
    assert second.recent_grad_sq_ratio.item() == pytest.approx(1e-4, rel=1e-3)
    bc = [1 - beta2**t for t in (31, 36)]
    v_then = 1 - beta2**31
    v_now = beta2**5 * v_then + (1 - beta2) * sum(beta2**j * 1e-4 for j in range(5))
    assert second.second_moment_change.item() == pytest.approx((v_now / bc[1]) / (v_then / bc[0]), rel=1e-9)
    _, per_group = second.group("module")
    assert per_group["recent_grad_sq_ratio"].item() == pytest.approx(1e-4, rel=1e-3)


def test_the_evidence_makes_no_host_sync(monkeypatch):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    layout = ParameterLayout.from_module(model, optimizer)
    tracker = AdamStateTracker(optimizer)
    for step in range(2):
        _backward(model, step)
        tracker.compute(compute_gradient_stats(layout))
        optimizer.step()
    reads = []
    for method in ("item", "tolist", "cpu", "__float__", "__bool__", "__int__", "numpy"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            reads.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    _backward(model, 5)
    stats = compute_gradient_stats(layout)
    evidence = tracker.compute(stats)
    evidence.group("module")
    evidence.total_outlier_fraction()
    monkeypatch.undo()
    assert reads == []


def test_other_optimizers_are_refused_by_the_tracker_and_get_no_adam_panels(memory_logger):
    assert not AdamStateTracker.supports(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.raises(TypeError, match="`optimizer`"):
        AdamStateTracker(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    trainer = quiet_trainer(max_steps=6, logger=memory_logger, log_every_n_steps=1,
                            callbacks=[GradNormMonitor(adam_every_n_steps=1, heatmap_every_n_steps=None)])
    module = TinyRegressor()  # SGD
    trainer.fit(module)
    assert not [title for title in trainer.callbacks[0].tensorboard_charts(trainer, module) if "Adam" in title]
    assert memory_logger.metrics["gradstab/grad_norm/total"]
    assert not [tag for tag in memory_logger.metrics if tag.startswith("gradstab/adam/")]


class AdamRegressor(TinyRegressor):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def test_the_monitor_logs_adam_panels_and_leaves_the_evidence_on_the_shared_statistics(memory_logger):
    from lightning.pytorch.callbacks import Callback

    from lightning_gradstab.callbacks._shared import gradient_stats

    seen = []

    class Reader(Callback):  # runs after the monitor, as the guard would
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(gradient_stats(trainer, pl_module, optimizer).adam)

    monitor = GradNormMonitor(adam_every_n_steps=3, heatmap_every_n_steps=None)
    trainer = quiet_trainer(max_steps=7, logger=memory_logger, log_every_n_steps=1, callbacks=[monitor, Reader()])
    module = AdamRegressor()
    trainer.fit(module)
    charts = monitor.tensorboard_charts(trainer, module)
    assert len([title for title in charts if title.startswith("Adam ")]) == 3
    assert [evidence is not None for evidence in seen] == [False, False, False, True, False, False, True]
    assert [step for step, _ in memory_logger.metrics["gradstab/adam/log10_update_rms/layer_max"]] == [3, 6]
    assert [step for step, _ in memory_logger.metrics["gradstab/adam/log10_recent_grad_sq_ratio/layer_min"]] == [6]
    update_rms = memory_logger.metrics["gradstab/adam/update_rms/net.0"][-1][1]
    assert update_rms == pytest.approx(seen[-1].group("module")[1]["update_rms"][0].item())
    assert 0 < update_rms <= 0.01 * 1.01  # Adam's update is at most about lr per coordinate
    assert "gradstab/adam/outlier_fraction/total" in memory_logger.metrics


def test_bad_arguments_are_refused_naming_them():
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="`outlier_threshold`"):
        AdamStateTracker(optimizer, outlier_threshold=0)
    with pytest.raises(ValueError, match="`adam_every_n_steps`"):
        GradNormMonitor(adam_every_n_steps=0)


def test_the_module_example_runs():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters())
    layout = ParameterLayout.from_module(model, optimizer)
    tracker = AdamStateTracker(optimizer)
    _backward(model, 0)
    assert tracker.compute(compute_gradient_stats(layout)) is None  # None before Adam's first step
    optimizer.step()
    _backward(model, 1)
    evidence = tracker.compute(compute_gradient_stats(copy.copy(layout)))
    assert evidence.update_rms.shape == (len(layout),)


def test_the_sharded_path_gives_the_replicated_answer_on_one_rank():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    layout = ParameterLayout.from_module(model, optimizer)
    _backward(model, 0)
    optimizer.step()
    _backward(model, 1)
    replicated = AdamStateTracker(optimizer).compute(compute_gradient_stats(layout))
    sharded = AdamStateTracker(optimizer).compute(compute_gradient_stats(layout, sharded=True))
    torch.testing.assert_close(sharded.update_rms, replicated.update_rms)
    torch.testing.assert_close(sharded.sums, replicated.sums)
