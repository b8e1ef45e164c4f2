"""The shortcuts that make the probe cheaper give the answers of the long way round."""

from __future__ import annotations

import torch
from torch import nn

import lightning_gradstab.diagnosis.module_roles as module_roles
from lightning_gradstab import diagnose
from lightning_gradstab.diagnosis.behaviour import affine_gain, linear_part_gain, norm_gain, scaling_behaviour
from lightning_gradstab.diagnosis.measurements import _alive_units
from lightning_gradstab.diagnosis.probe import run_probe
from lightning_gradstab.diagnosis.tracer import GraphTracer


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
    classify = module_roles.classify_elementwise

    def counting(module, like):
        calls.append(module.slope)
        return classify(module, like)

    monkeypatch.setattr(module_roles, "classify_elementwise", counting)
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


class _RMSNorm(nn.Module):
    """An RMSNorm the tracer knows only by behaviour (Hugging Face's LlamaRMSNorm in a few lines)."""

    def __init__(self, width: int, gain: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((width,), gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)


class _NormedStack(nn.Module):
    def __init__(self, gains: list[float]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in gains)
        self.norms = nn.ModuleList(_RMSNorm(16, gain) for gain in gains)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = norm(torch.relu(layer(x)))
        return x


def _record_full_tests(monkeypatch, parameter: str) -> list[float]:
    """The first entry of ``parameter`` of every module the full scaling test is run on, in call order."""
    tested: list[float] = []
    full_test = module_roles.scaling_behaviour

    def counting(module, args):
        tested.append(getattr(module, parameter).detach()[0].item())
        return full_test(module, args)

    monkeypatch.setattr(module_roles, "scaling_behaviour", counting)
    return tested


def test_equal_normalizations_are_tested_once_each_keeping_its_own_gain(monkeypatch):
    tested = _record_full_tests(monkeypatch, "weight")
    gains = [1.0, 0.5, 2.0, 0.0, 3.0]
    model = _NormedStack(gains)
    tracer = GraphTracer(model)
    with tracer.tracing():
        model(torch.randn(32, 16))
    graph = tracer.build(None)
    # the first instance is tested in full; a zero gain (output 0 at every scale) is left to the full test
    assert tested == [1.0, 0.0]
    measured = {name: gain for name, gain in graph.norm_gains.items()}
    for index, gain in enumerate(gains):
        if gain:  # the RMS of gain x a normalised input, measured per instance, as the full test reads it
            assert abs(measured[f"norms.{index}"] - gain) < 1e-3 * gain
    kinds = {node.name: node.kind for node in graph.nodes}
    assert [kinds[f"norms.{i}"] for i in (0, 1, 2, 4)] == ["norm"] * 4


class _Affine(nn.Module):
    """ResMLP's Affine (Touvron et al. 2021): ``alpha * x + beta`` per channel, known only by behaviour."""

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((16,), alpha))
        self.beta = nn.Parameter(torch.full((16,), beta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta


class _AffineStack(nn.Module):
    def __init__(self, affines: list[tuple[float, float]]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in affines)
        self.affines = nn.ModuleList(_Affine(alpha, beta) for alpha, beta in affines)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, affine in zip(self.layers, self.affines, strict=True):
            x = x + affine(torch.relu(layer(x)))
        return x


def test_the_gain_of_an_equal_scaling_is_the_full_tests_gain_bit_for_bit():
    x = torch.randn(8, 16)
    for alpha, beta in ((1e-3, 0.5), (2.0, 0.0), (0.0, 0.0), (-0.3, 1.0)):
        module = _Affine(alpha, beta)
        assert linear_part_gain(module, (x,)) == affine_gain(module, (x,))
    # a zero scale with a bias outputs a constant, which the full tests read as a normalization: left to them
    assert linear_part_gain(_Affine(0.0, 0.5), (x,)) is None
    assert scaling_behaviour(_Affine(0.0, 0.5), (x,))[0] == "norm"


def test_equal_scalings_are_tested_once_each_keeping_its_own_gain(monkeypatch):
    tested = _record_full_tests(monkeypatch, "alpha")
    affines = [(0.25, 0.0), (0.5, 0.1), (0.0, 0.0), (0.0, 0.2), (3.0, -1.0)]
    inputs = torch.randn(32, 16)
    roles = {}
    for shortcut in (True, False):
        tested.clear()
        model = _AffineStack(affines)
        tracer = GraphTracer(model)
        if not shortcut:  # every instance its own full test: what the shortcut must reproduce
            monkeypatch.setattr(module_roles.ModuleRoles, "_leaf_role", _without_memory(module_roles.ModuleRoles))
        with tracer.tracing():
            model(inputs)
        tracer.build(None)
        roles[shortcut] = {
            name: tracer.module_calls.roles.decided[id(module)] for name, module in model.affines.named_children()
        }
        if shortcut:
            # the first instance is tested in full, and the zero scale with a bias (a constant output) again
            assert tested == [0.25, 0.0]
    assert roles[True] == roles[False]
    assert [roles[True][str(i)][0] for i in range(5)] == ["scale", "scale", "scale", "norm", "scale"]


def _without_memory(cls):
    leaf_role = cls._leaf_role

    def forgetting(self, module, args):
        self._scalings.clear()
        self._normalizations.clear()
        return leaf_role(self, module, args)

    return forgetting


def test_live_units_read_nan_as_not_positive_like_a_comparison_does():
    output = torch.tensor([[0.0, 1.0, float("nan")], [0.0, float("nan"), 0.0]]).relu()
    expected = (output > 0).any(dim=0).sum()
    assert _alive_units(output[None], -1).tolist() == [expected] == [1]
    feature_maps = torch.zeros(2, 3, 4, 4)
    feature_maps[1, 2, 3, 3] = 0.5
    assert _alive_units(torch.stack([feature_maps, feature_maps.relu() * 0]), 1).tolist() == [1, 0]


class _InPlace(nn.Module):
    """Layers whose outputs are overwritten in place after they are recorded: the statistics must be those of
    the output when the layer produced it, as if read right away."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))  # nn.ReLU(inplace=True): F.relu(..., inplace=True)
        g = self.fc2(h)
        g += 1.0  # Tensor.__iadd__
        g.mul_(0.5)
        return self.fc3(torch.tanh(g))


def _per_tensor(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[float, float, float]]:
    """Each layer's output mean and std and the RMS of the gradient at its output, read one tensor at a time
    (the long way round: a copy of the output when produced, a hook on it)."""
    seen: dict[str, list] = {}

    def hook(name):
        def record(module, args, output):
            copy = output.detach().clone()
            seen[name] = [copy.mean().item(), torch.std(copy).item(), None]
            output.register_hook(lambda grad: seen[name].__setitem__(2, grad.square().mean().sqrt().item()))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    torch.manual_seed(0)
    output = model(x)
    direction = torch.randn(output.shape, generator=torch.Generator().manual_seed(0))
    (output * direction).sum().backward()
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)
    return {name: tuple(values) for name, values in seen.items()}


def test_batched_statistics_equal_per_tensor_reads_even_when_outputs_are_overwritten_in_place():
    model, x = _InPlace(), torch.randn(32, 16)
    result = run_probe(model, lambda batch: model(batch), inputs=x)
    expected = _per_tensor(model, x)
    measured = {p.name: (p.output_mean, p.output_std, p.grad_rms) for p in result.layers}
    assert set(measured) == set(expected) == {"fc1", "fc2", "fc3"}
    for name, values in expected.items():
        assert measured[name] == values, name  # bit for bit: the same reductions, stacked or not
    (relu,) = [a for a in result.activations if a.op == "relu"]
    h = torch.relu(model.fc1(x))
    assert relu.dead_fraction == 1.0 - float((h > 0).any(dim=0).sum()) / 16


def test_stacked_reductions_equal_one_call_per_tensor():
    from lightning_gradstab.diagnosis.measurements import Measurements

    measurements = Measurements(nn.Linear(1, 1))
    tensors = [torch.randn(4, 8, 5) * (i + 1) + i for i in range(6)] + [torch.randn(300, 200), torch.randn(3)]
    for slot, tensor in enumerate(tensors):
        measurements._pending_layers.append((slot, tensor))
    measurements.flush()
    numbers = torch.cat(measurements._parts).tolist()
    for slot, tensor in enumerate(tensors):
        mean_at, std_at = measurements.layer_positions[slot]
        assert [numbers[mean_at], numbers[std_at]] == [tensor.mean().item(), torch.std(tensor).item()]


def test_written_tensors_name_what_a_call_may_overwrite():
    from torch.nn import functional as F

    from lightning_gradstab.diagnosis.in_place import written_tensors

    x, y = torch.randn(4, 3), torch.randn(4, 3)
    mean, var = torch.zeros(3), torch.ones(3)
    assert written_tensors(torch.Tensor.add_, (x, y), {}) == [x]
    assert written_tensors(torch.Tensor.__setitem__, (x, 0, y), {}) == [x]
    assert written_tensors(torch.add, (x, y), {"out": y}) == [y]
    assert written_tensors(F.relu, (x, True), {}) == [x]
    assert written_tensors(F.relu, (x,), {"inplace": True}) == [x]
    assert written_tensors(F.dropout, (x, 0.5, True), {}) == []  # `training`, not `inplace`
    written = written_tensors(F.batch_norm, (x, mean, var, None, None, True, 0.1, 1e-5), {})
    assert written is not None and all(t is not x for t in written) and any(t is mean for t in written)


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_running_statistics_written_in_place_leave_the_pending_outputs_stacked(monkeypatch):
    from lightning_gradstab.diagnosis.measurements import Measurements

    flushes = []
    flush = Measurements.flush

    def counting(self):
        flushes.append(len(self._pending_layers))
        return flush(self)

    monkeypatch.setattr(Measurements, "flush", counting)
    model, x = _BatchNormNet(), torch.randn(32, 16)
    result = run_probe(model, lambda batch: model(batch), inputs=x)
    assert flushes == [5]  # BatchNorm's running statistics are no pending output: one stacked read at the end
    monkeypatch.setattr(Measurements, "flush", flush)
    expected = _per_tensor(model, x)
    measured = {p.name: (p.output_mean, p.output_std, p.grad_rms) for p in result.layers}
    assert measured == expected
