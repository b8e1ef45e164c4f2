"""The adaptive-optimizer advice: given from evidence with a meaning, on tiny models that really train.

The bad case is a readout stored 100x small and applied 100x large (an output multiplier): under SGD its
gradient-to-weight ratio is ~10^3-10^4 times the hidden layers', so the largest learning rate it tolerates leaves the
hidden layers where they started and the loss stalls; Adam, which scales each coordinate's step by its own
gradient's RMS, trains the same model. The healthy runs are the same architecture without the multiplier under
SGD, and either model under Adam.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradstab.diagnosis.optimizer_rules import (
    GRAD_TO_WEIGHT_SPREAD,
    adaptive_optimizer_evidence,
    adaptive_optimizer_findings,
    adaptive_optimizer_recommendation,
    grad_to_weight_ratios,
    is_plain_sgd,
)
from lightning_gradstab.report import Finding

STEPS = 40
STALL = 0.1  # ArchitectureAdvisor's default stall_improvement


class MultipliedLinear(nn.Linear):
    """A Linear whose weight is stored ``multiplier`` times smaller and applied ``multiplier`` times larger."""

    def __init__(self, in_features: int, out_features: int, multiplier: float) -> None:
        super().__init__(in_features, out_features)
        self.multiplier = multiplier
        with torch.no_grad():
            self.weight /= multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.multiplier, self.bias)


def _model(multiplier: float, width: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), MultipliedLinear(width, 1, multiplier)
    )


def _train(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, list[float]], list[float]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=generator)
    y = torch.tanh(x @ torch.randn(16, 1, generator=generator))
    ratios: dict[str, list[float]] = {}
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        for name, ratio in grad_to_weight_ratios(model.named_parameters()).items():
            ratios.setdefault(name, []).append(ratio)
        optimizer.step()
        losses.append(loss.item())
    return ratios, losses


def test_sgd_held_back_by_a_multiplied_readout_gets_the_adaptive_optimizer_advice_and_adam_trains_it():
    model = _model(multiplier=100.0)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4)
    ratios, losses = _train(model, sgd)
    evidence = adaptive_optimizer_evidence(sgd, ratios, losses, STALL)
    assert evidence is not None
    assert evidence["fastest_layer"] == "4.weight" and evidence["slowest_layer"] in ("0.weight", "2.weight")
    assert evidence["grad_to_weight_spread"] >= GRAD_TO_WEIGHT_SPREAD
    assert evidence["relative_improvement"] < STALL and evidence["optimizer"] == "SGD"
    recommendation = adaptive_optimizer_recommendation(evidence)
    assert "Adam" in recommendation and "4.weight" in recommendation
    # the advice is right: 10x the learning rate diverges under SGD, while Adam trains the same model
    diverging = _model(multiplier=100.0)
    _, faster = _train(diverging, torch.optim.SGD(diverging.parameters(), lr=1e-3))
    assert not math.isfinite(faster[-1])
    adam_model = _model(multiplier=100.0)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-2)
    adam_ratios, adam_losses = _train(adam_model, adam)
    assert adam_losses[-1] < 0.25 * losses[-1]
    assert adaptive_optimizer_evidence(adam, adam_ratios, adam_losses, STALL) is None  # adaptive already: silent


def test_sgd_on_a_well_scaled_net_that_trains_gets_no_optimizer_advice():
    model = _model(multiplier=1.0, width=8)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    ratios, losses = _train(model, sgd)
    assert losses[-1] < 0.5 * losses[0]
    assert adaptive_optimizer_evidence(sgd, ratios, losses, STALL) is None


def test_a_stalled_run_whose_layers_move_alike_gets_no_optimizer_advice():
    # a learning rate that is simply too small: every layer is slow, the spread stays below two orders of magnitude
    model = _model(multiplier=1.0, width=8)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-5)
    ratios, losses = _train(model, sgd)
    assert (losses[0] - losses[-1]) / losses[0] < STALL
    assert adaptive_optimizer_evidence(sgd, ratios, losses, STALL) is None


def test_momentum_sgd_counts_as_plain_sgd_and_adaptive_optimizers_do_not():
    parameters = [nn.Parameter(torch.zeros(2))]
    assert is_plain_sgd(torch.optim.SGD(parameters, lr=0.1, momentum=0.9, nesterov=True))
    for adaptive in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        assert not is_plain_sgd(adaptive(parameters))


def test_grad_to_weight_ratios_skip_biases_and_parameters_without_gradients():
    layer = nn.Linear(4, 3)
    frozen = nn.Linear(3, 2)
    layer(torch.ones(1, 4)).sum().backward()
    ratios = grad_to_weight_ratios([*layer.named_parameters(), ("frozen.weight", frozen.weight)])
    expected = (layer.weight.grad.norm() / layer.weight.norm()).item()
    assert list(ratios) == ["weight"] and ratios["weight"] == pytest.approx(expected)


def test_bad_arguments_name_themselves():
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match="`optimizer`"):
        adaptive_optimizer_evidence("sgd", {}, [], STALL)
    with pytest.raises(TypeError, match="`grad_to_weight`"):
        adaptive_optimizer_evidence(sgd, [1.0], [], STALL)
    with pytest.raises(ValueError, match="`stall_improvement`"):
        adaptive_optimizer_evidence(sgd, {}, [], 1.5)
    with pytest.raises(TypeError, match="`named_parameters`"):
        grad_to_weight_ratios([torch.zeros(2)])


def test_the_finding_names_the_modules_and_gives_way_to_a_vanishing_gradient_finding_that_explains_the_spread():
    model = _model(multiplier=100.0)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4)
    ratios, losses = _train(model, sgd)
    (finding,) = adaptive_optimizer_findings(sgd, ratios, losses, STALL)
    assert finding.code == "optimizer.adaptive" and finding.severity == "warning" and finding.modules[0] == "4"
    for cited in ("You et al. 2017", "Kingma & Ba 2015", "RMSProp", "AdamW", "LARS"):
        assert cited in finding.recommendation
    vanishing = Finding("signal.vanishing", "warning", ("0", "2"), {}, "see arch.normalization")
    assert adaptive_optimizer_findings(sgd, ratios, losses, STALL, [vanishing]) == []
