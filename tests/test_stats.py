"""The fused statistics pass equals a naive float64 computation, whatever the parameters look like."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradstab.stats import (
    ParameterLayout,
    clean_parameter_name,
    compute_gradient_stats,
    group_name,
    validate_group_by,
)
from tests.conftest import reference_group_norms


class FrozenTiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.unused = nn.Linear(8, 8)  # gets no gradient: grad stays None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.frozen(self.embed(tokens))))


def backward_once(model: nn.Module, seed: int = 0) -> None:
    torch.manual_seed(seed)
    tokens = torch.randint(0, 11, (4, 5))
    model(tokens).logsumexp(-1).sum().backward()


def test_total_and_group_norms_match_float64_reference_with_frozen_tied_and_unused_parameters():
    torch.manual_seed(0)
    model = FrozenTiedNet()
    backward_once(model)
    layout = ParameterLayout.from_module(model)
    stats = compute_gradient_stats(layout)

    assert "frozen" not in {group_name(n, "module") for n in layout.names}
    assert sum(p is model.embed.weight for p in layout.parameters) == 1  # tied weight counted once
    expected_groups, expected_total = reference_group_norms(model, lambda n: group_name(n, "module"))
    names, norms = stats.group_norms("module")
    measured = dict(zip(names, norms.tolist(), strict=True))
    assert measured.pop("unused") == 0.0  # a None gradient has norm 0
    assert measured == pytest.approx(expected_groups, rel=1e-5)
    assert float(stats.total_norm) == pytest.approx(expected_total, rel=1e-5)
    assert float(stats.nonfinite_count) == 0


@pytest.mark.parametrize("ord", [1.0, 3.0, math.inf])
def test_other_norm_orders_match_torch_reference(ord):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))
    model(torch.randn(5, 6)).square().sum().backward()
    stats = compute_gradient_stats(ParameterLayout.from_module(model))
    grads = [p.grad.double().flatten() for p in model.parameters()]
    expected_total = float(torch.linalg.vector_norm(torch.cat(grads), ord))
    assert float(stats.total(ord)) == pytest.approx(expected_total, rel=1e-5)
    names, norms = stats.group_norms("module", ord)
    first = torch.cat([model[0].weight.grad.flatten(), model[0].bias.grad.flatten()]).double()
    assert names == ("0", "2")
    assert float(norms[0]) == pytest.approx(float(torch.linalg.vector_norm(first, ord)), rel=1e-5)


def test_sparse_embedding_gradients_are_measured():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(50, 4, sparse=True), nn.Linear(4, 2))
    model(torch.tensor([[1, 1, 3]])).sum().backward()  # repeated index: duplicates must be summed first
    assert model[0].weight.grad.is_sparse
    stats = compute_gradient_stats(ParameterLayout.from_module(model))
    _, expected_total = reference_group_norms(model, lambda n: n)
    assert float(stats.total_norm) == pytest.approx(expected_total, rel=1e-5)


def test_nonfinite_gradients_are_counted_per_parameter_and_per_group():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model(torch.randn(2, 3)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    model[1].bias.grad[1] = float("inf")
    stats = compute_gradient_stats(ParameterLayout.from_module(model))
    assert float(stats.nonfinite_count) == 2
    assert not math.isfinite(float(stats.total_norm))
    names, counts = stats.group_nonfinite_counts("module")
    assert dict(zip(names, counts.tolist(), strict=True)) == {"0": 1.0, "1": 1.0}


def test_mixed_dtypes_are_bucketed_and_reported_in_float32():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16))
    x = torch.randn(3, 4)
    model[1](model[0](x).bfloat16()).float().sum().backward()
    stats = compute_gradient_stats(ParameterLayout.from_module(model))
    assert stats.param_sq_norms.dtype == torch.float32
    _, expected_total = reference_group_norms(model, lambda n: n)
    assert float(stats.total_norm) == pytest.approx(expected_total, rel=1e-3)


def test_layout_follows_the_optimizer_parameters():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1)
    layout = ParameterLayout.from_module(model, optimizer)
    assert layout.names == ("1.weight", "1.bias")


def test_group_names_by_depth_and_wrapper_prefixes_are_removed():
    assert group_name("encoder.layers.3.attn.q.weight", 2) == "encoder.layers"
    assert group_name("encoder.layers.3.attn.q.weight", "module") == "encoder.layers.3.attn.q"
    assert group_name("bias", "module") == "bias"
    assert clean_parameter_name("_orig_mod.block._fsdp_wrapped_module.fc.weight") == "block.fc.weight"


@pytest.mark.parametrize("bad", ["layer", 0, -1, 1.5, True, None])
def test_unknown_grouping_is_rejected_with_the_accepted_values(bad):
    with pytest.raises(ValueError, match=r"group_by.*'module', 'parameter' or a positive int"):
        validate_group_by(bad)
