"""The weight-decay rule as a pure function: what counts as growth, as decay, and what keeps it silent.

The real tiny runs (a noisy-label tanh MLP under SGD that grows its weights while its loss rises, and the same
run with decay, or at a rate whose loss improves) are in ``tests/test_advisor_optimizer.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradstab.diagnosis.weight_decay_rules import (
    MIN_WEIGHT_SAMPLES,
    WEIGHT_NORM_GROWTH,
    log_growth,
    parameter_weight_decay,
    weight_decay_evidence,
    weight_decay_findings,
)

STALL = 0.1
FLAT = [1.3] * 50
STEPS = range(10)
GROWING = {"a.weight": [1.0 * 1.3**t for t in STEPS], "b.weight": [2.0 * 1.2**t for t in STEPS]}
GRADS_GROWING = {"a.weight": [0.1 * 1.1**t for t in STEPS], "b.weight": [0.1 * 1.1**t for t in STEPS]}
NO_DECAY = {"a.weight": 0.0, "b.weight": 0.0}


def test_weights_growing_with_their_gradients_under_a_flat_loss_without_decay_are_named_fastest_first():
    (finding,) = weight_decay_findings(GROWING, GRADS_GROWING, FLAT, STALL, NO_DECAY)
    assert finding.code == "optimizer.weight_decay" and finding.severity == "warning"
    assert finding.modules == ("a", "b")
    assert finding.evidence["weight_norm_growth"] >= WEIGHT_NORM_GROWTH
    assert finding.evidence["grad_norm_growth"] > 1 and finding.evidence["layers_without_decay"] == 2
    for cited in ("Loshchilov & Hutter 2019", "van Laarhoven 2017", "Zhang et al. 2019", "lower the learning rate"):
        assert cited in finding.recommendation


def test_silent_when_the_loss_improves_the_matrices_are_decayed_or_the_gradient_falls():
    improving = [2.0 - 0.03 * t for t in range(50)]
    assert weight_decay_evidence(GROWING, GRADS_GROWING, improving, STALL, NO_DECAY) is None
    assert weight_decay_evidence(GROWING, GRADS_GROWING, FLAT, STALL, {"a.weight": 0.01, "b.weight": 5e-4}) is None
    assert weight_decay_evidence(GROWING, GRADS_GROWING, FLAT, STALL, {}) is None  # decay unknown: no claim
    # behind a normalization the gradient falls as 1/||w||: such runs trained as well without decay
    falling = {name: [0.1 / v for v in values] for name, values in GROWING.items()}
    assert weight_decay_evidence(GROWING, falling, FLAT, STALL, NO_DECAY) is None


def test_silent_when_the_weights_grow_less_than_twofold_or_are_sampled_too_few_times():
    slow = {name: [values[0] * 1.05**t for t in STEPS] for name, values in GROWING.items()}
    assert weight_decay_evidence(slow, GRADS_GROWING, FLAT, STALL, NO_DECAY) is None
    few = {name: values[: MIN_WEIGHT_SAMPLES - 1] for name, values in GROWING.items()}
    few_grads = {name: values[: MIN_WEIGHT_SAMPLES - 1] for name, values in GRADS_GROWING.items()}
    assert weight_decay_evidence(few, few_grads, FLAT, STALL, NO_DECAY) is None


def test_only_the_undecayed_layers_count():
    # the fast-growing layer is decayed; the undecayed one alone grew 1.05x per sample: no finding
    weights = {"a.weight": [1.3**t for t in STEPS], "b.weight": [10.0 * 1.05**t for t in STEPS]}
    assert weight_decay_evidence(weights, GRADS_GROWING, FLAT, STALL, {"a.weight": 0.0, "b.weight": 0.1}) is not None
    assert weight_decay_evidence(weights, GRADS_GROWING, FLAT, STALL, {"a.weight": 0.1, "b.weight": 0.0}) is None


def test_log_growth_is_the_theil_sen_trend_and_ignores_outliers_and_bad_values():
    assert log_growth([1.0, 2.0, 4.0, 8.0]) == pytest.approx(8.0)
    assert log_growth([1.0, 2.0, 1e9, 8.0, 16.0]) == pytest.approx(16.0)
    assert log_growth([1.0, math.nan, 4.0, 0.0, 16.0]) == pytest.approx(16.0)
    assert math.isnan(log_growth([1.0]))


def test_parameter_weight_decay_reads_each_parameters_group():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    matrices = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    adamw = torch.optim.AdamW([{"params": matrices}, {"params": biases, "weight_decay": 0.0}], lr=1e-3)
    decay = parameter_weight_decay(adamw, model.named_parameters())
    assert decay == {"0.weight": 0.01, "0.bias": 0.0, "1.weight": 0.01, "1.bias": 0.0}
    assert parameter_weight_decay(torch.optim.SGD(matrices, lr=0.1), model.named_parameters()) == {
        "0.weight": 0.0,
        "1.weight": 0.0,
    }


def test_bad_arguments_name_themselves():
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match=r"`optimizer` must be a torch\.optim\.Optimizer, got str"):
        parameter_weight_decay("sgd", [])
    with pytest.raises(TypeError, match="`named_parameters` must yield"):
        parameter_weight_decay(sgd, [torch.zeros(1)])
    with pytest.raises(TypeError, match="`weight_norms` must map layer names"):
        weight_decay_evidence([1.0], {}, FLAT, STALL, {})
    with pytest.raises(TypeError, match="`weight_decay` must map layer names"):
        weight_decay_evidence({}, {}, FLAT, STALL, 0.0)
    with pytest.raises(ValueError, match="`stall_improvement` must be a float in \\(0, 1\\), got 2"):
        weight_decay_evidence({}, {}, FLAT, 2, {})
    with pytest.raises(ValueError, match=r"'a\.weight' has 10 weight norms and 3 gradient norms"):
        weight_decay_evidence(GROWING, {"a.weight": [1.0] * 3, "b.weight": [1.0] * 10}, FLAT, STALL, NO_DECAY)
