"""The shortcuts that make the probe cheaper give the answers of the long way round."""

from __future__ import annotations

import torch
from torch import nn

import lightning_gradstab.diagnosis.tracer as tracer_module
from lightning_gradstab import diagnose
from lightning_gradstab.diagnosis.ops import affine_gain, norm_gain, scaling_behaviour
from lightning_gradstab.diagnosis.probe import _alive_units


class Leaky(nn.Module):
    """An elementwise activation the tracer knows only by behaviour; ``slope`` decides what it computes."""

    def __init__(self, slope: float) -> None:
        super().__init__()
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, self.slope * x)


class Gain(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((16,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * x + 1.0


class Gate(nn.Module):
    """SkipInit's gate (De & Smith 2020): a learnable scalar times the branch, 0 at init."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x


def _net(slopes: list[float]) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for slope in slopes:
        layers += [nn.Linear(16, 16), Leaky(slope)]
    return nn.Sequential(*layers, nn.Linear(16, 4))


def test_equal_elementwise_modules_are_classified_once_and_different_ones_each(monkeypatch):
    calls = []
    classify = tracer_module.classify_elementwise

    def counting(module, like):
        calls.append(module.slope)
        return classify(module, like)

    monkeypatch.setattr(tracer_module, "classify_elementwise", counting)
    report = diagnose(_net([0.1, 0.1, 0.1, 0.0]), torch.randn(32, 16))
    assert sorted(calls) == [0.0, 0.1]
    activations = {row["name"]: row["activation"] for row in report.layers}
    assert activations["0"] == activations["2"] == activations["4"] == "leaky_relu"
    assert activations["6"] == "relu"


def test_scaling_behaviour_agrees_with_the_norm_and_affine_tests():
    x = torch.randn(8, 16)
    layer_norm = nn.LayerNorm(16)
    assert scaling_behaviour(layer_norm, (x,)) == ("norm", norm_gain(layer_norm, (x,)))
    gate = Gain(1e-3)
    kind, gain = scaling_behaviour(gate, (x,))
    assert kind == "scale" and abs(gain - 1e-3) < 1e-9 and gain == affine_gain(gate, (x,))
    assert scaling_behaviour(nn.Tanh(), (x,)) is None  # neither: a layer, or traced inside
    assert scaling_behaviour(Gate(), (x,)) == ("scale", 0.0)  # closed: measured through, not a normalization


def test_live_units_read_nan_as_not_positive_like_a_comparison_does():
    output = torch.tensor([[0.0, 1.0, float("nan")], [0.0, float("nan"), 0.0]]).relu()
    expected = (output > 0).any(dim=0).sum()
    assert _alive_units(output, -1) == expected == 1
    feature_maps = torch.zeros(2, 3, 4, 4)
    feature_maps[1, 2, 3, 3] = 0.5
    assert _alive_units(feature_maps, 1) == 1
