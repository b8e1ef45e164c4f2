"""The third held-out healthy set: seven new shapes, each with a named metric; every task builds and trains unguarded
and guarded; the pieces mean what they say (``--suite holdout3`` of the runner: tests/test_healthy_holdout2.py)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import divergence
from benchmarks.healthy_holdout import HOLDOUT_TASKS
from benchmarks.healthy_holdout2 import HOLDOUT2_TASKS
from benchmarks.healthy_holdout3 import (
    HOLDOUT3_TASKS,
    METRICS,
    SAM,
    _poisson_solution,
    _poisson_source,
    _student_t2,
)
from benchmarks.healthy_tasks import HEALTHY_TASKS

STEPS = 4


def test_the_third_holdout_set_has_seven_new_shapes_each_with_a_named_task_metric():
    assert len(HOLDOUT3_TASKS) == 7
    assert set(METRICS) == set(HOLDOUT3_TASKS)
    assert not set(HOLDOUT3_TASKS) & (set(HEALTHY_TASKS) | set(HOLDOUT_TASKS) | set(HOLDOUT2_TASKS))
    assert all(task.kind == "healthy" for task in HOLDOUT3_TASKS.values())
    assert set(HOLDOUT3_TASKS) <= set(divergence.all_tasks())
    assert set(METRICS.items()) <= set(divergence.healthy_metrics().items())


@pytest.mark.parametrize("method", ["none", "guard"])
@pytest.mark.parametrize("name", list(HOLDOUT3_TASKS))
def test_task_builds_and_one_fit_runs_to_a_finite_metric(name, method):
    """The guard too: a closure the optimizer calls several times per step (L-BFGS, SAM), double backpropagation
    (the PINN) and a loss below zero must not break its machinery."""
    record = divergence.run_one(name, method, seed=0, steps=STEPS)
    assert record["status"] == "finished", record["error"]
    assert record["steps_done"] == STEPS
    assert math.isfinite(record["initial_loss"]) and math.isfinite(record["final_loss"])


def test_the_pinn_source_is_the_second_derivative_of_the_solution():
    x = torch.linspace(0.05, 0.95, 7, dtype=torch.float64).requires_grad_(True)
    (du,) = torch.autograd.grad(_poisson_solution(x).sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x)
    assert torch.allclose(d2u, _poisson_source(x.detach()), rtol=1e-10)
    assert float(_poisson_solution(torch.tensor([0.0, 1.0])).abs().max()) < 1e-5  # its boundary values


class _Exact(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _poisson_solution(x)


def test_the_pinn_metric_of_the_exact_solution_is_zero():
    built = HOLDOUT3_TASKS["pinn_poisson"].build(seed=0, steps=1)
    built.module.net = _Exact()  # the network that were the solution
    assert built.module.evaluate(built.eval_batches) == pytest.approx(0.0, abs=1e-7)


def test_the_student_t_draw_has_its_quantiles_and_no_finite_variance():
    u = torch.tensor([0.5, 0.75, 0.975])
    # Student's t with 2 degrees of freedom: median 0, upper quartile sqrt(2/3), 97.5 % point 4.303
    assert torch.allclose(_student_t2(u), torch.tensor([0.0, 0.8165, 4.3027]), atol=1e-4)
    draws = _student_t2(torch.rand(200_000, generator=torch.Generator().manual_seed(0)))
    assert float(draws.median().abs()) < 0.02
    assert float((draws**2).mean()) > 10  # the sample second moment is dominated by the tail (its mean is inf)


def test_sam_steps_the_base_optimizer_with_the_gradient_at_the_perturbed_weights():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = SAM([w], torch.optim.SGD, rho=0.5, lr=0.1)
    evaluated = []

    def closure():
        optimizer.zero_grad()
        evaluated.append(w.detach().clone())
        loss = (w**4).sum() / 4  # gradient w**3
        loss.backward()
        return loss

    optimizer.step(closure)
    g = torch.tensor([1.0, 8.0])
    perturbed = torch.tensor([1.0, 2.0]) + 0.5 * g / g.norm()
    assert torch.allclose(evaluated[0], torch.tensor([1.0, 2.0])) and torch.allclose(evaluated[1], perturbed)
    assert torch.allclose(w.detach(), torch.tensor([1.0, 2.0]) - 0.1 * perturbed**3)  # from w, with the new gradient


def test_the_uncertainty_weighted_loss_goes_below_zero_when_a_task_fits_well():
    built = HOLDOUT3_TASKS["uncertainty_multitask"].build(seed=0, steps=1)
    module, batch = built.module, built.train_batches[0]
    with torch.no_grad():
        module.log_variances.copy_(torch.tensor([0.0, -6.0]))  # a confident regression head
        assert float(module.compute_loss(batch)) > 0  # untrained: its errors weigh exp(6) / 2 each
        module.net[-1].weight.zero_()
        module.net[-1].bias.zero_()  # uniform class scores (cross-entropy log 10) and a regression output of 0
        fitted = {**batch, "r": torch.zeros_like(batch["r"])}
        loss = float(module.compute_loss(fitted))
    assert loss == pytest.approx(math.log(10) + 0.0 + 0.0 - 3.0, rel=1e-5)  # CE + s_c / 2 + 0 + s_r / 2
    assert loss < 0
