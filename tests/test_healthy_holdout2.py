"""The second held-out healthy set: six new shapes, each with a named metric (every task builds and trains
unguarded in tests/test_healthy_holdout.py); ``--suite holdout2`` of the benchmark runner knows them; the metrics
mean what they say."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import divergence
from benchmarks.healthy_holdout import HOLDOUT_TASKS
from benchmarks.healthy_holdout2 import HOLDOUT2_TASKS, METRICS, SwitchLayer, _ring_log_density
from benchmarks.healthy_tasks import HEALTHY_TASKS, _ring

STEPS = 4


def test_the_second_holdout_set_has_six_new_shapes_each_with_a_named_task_metric():
    assert len(HOLDOUT2_TASKS) == 6
    assert set(METRICS) == set(HOLDOUT2_TASKS)
    assert not set(HOLDOUT2_TASKS) & (set(HEALTHY_TASKS) | set(HOLDOUT_TASKS))
    assert all(task.kind == "healthy" for task in HOLDOUT2_TASKS.values())
    assert set(HOLDOUT2_TASKS) <= set(divergence.all_tasks())
    assert set(METRICS.items()) <= set(divergence.healthy_metrics().items())


def test_the_ring_density_integrates_to_one_and_peaks_at_the_modes():
    # a Riemann sum over a grid fine against the modes' std (0.02) covering the ring
    step = 0.004
    axis = torch.arange(-2.2, 2.2, step)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    total = float(_ring_log_density(grid).exp().sum() * step**2)
    assert total == pytest.approx(1.0, rel=1e-3)
    on_mode, off_mode = _ring_log_density(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    assert float(on_mode) == pytest.approx(-math.log(8 * 2 * math.pi * 0.02**2), rel=1e-4) and off_mode < -1e3


def test_the_flow_metric_is_the_kl_divergence_to_the_data_so_the_data_density_itself_scores_zero():
    built = HOLDOUT2_TASKS["realnvp_ring"].build(seed=0, steps=1)
    module, batch = built.module, built.eval_batches[0]
    module.compute_loss = lambda b: -_ring_log_density(b["x"])  # a flow that were the data's density
    assert module.evaluate([batch]) == pytest.approx(0.0, abs=1e-6)
    samples = _ring(2000, torch.Generator().manual_seed(0))
    # its entropy, log 8 + log(2 pi e 0.02^2) = -2.91: the negative log-likelihood has no floor at zero
    assert float(-_ring_log_density(samples).mean()) == pytest.approx(-2.91, abs=0.05)


def test_a_switch_layer_routes_each_token_to_one_expert_and_unchosen_experts_get_no_gradient():
    torch.manual_seed(0)
    layer = SwitchLayer(width=8, experts=4)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # every token prefers expert 0
    x = torch.randn(16, 8)
    out = layer(x)
    probs = torch.softmax(layer.router(x), -1)
    assert torch.allclose(out, x + probs[:, :1] * layer.experts[0](x), atol=1e-6)
    assert float(layer.aux_loss) == pytest.approx(4 * float(probs.mean(0)[0]), rel=1e-6)
    out.sum().backward()
    assert layer.experts[0][0].weight.grad is not None
    assert all(expert[0].weight.grad is None for expert in layer.experts[1:])


@pytest.mark.parametrize(
    ("suite", "task", "metric"),
    [("holdout2", "mixup_digits", "error rate"), ("holdout3", "pinn_poisson", "relative L2 error")],
)
def test_the_runner_accepts_the_later_holdout_suites(suite, task, metric, tmp_path, monkeypatch):
    """The second and the third held-out sets (:mod:`benchmarks.healthy_holdout3`)."""
    monkeypatch.setattr(divergence, "freeze_package", lambda: "test")  # no copy of the package on sys.path
    out = tmp_path / suite
    arguments = f"--suite {suite} --tasks {task} --methods none --seeds 1 --jobs 1 --steps 3 --out"
    code = divergence.main([*arguments.split(), str(out)])
    assert code == 0
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# Held-out healthy shapes") and f"| {task} | {metric} |" in text
