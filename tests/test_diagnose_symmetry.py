"""``init.symmetric`` asks the gradient: units that start identical are an error only when their gradient rows tie
too (nothing downstream tells them apart, so they stay identical); a zero start the first step separates (a
router, a gate, a query zeroed on purpose) is no finding; a shared constant start the gradient separates is a
warning; a weight whose rows are copies by construction (``expand``) is no evidence."""

from __future__ import annotations

import torch
from torch import nn

from lightning_gradstab import diagnose
from lightning_gradstab.diagnosis.symmetry import GRADIENT_TIE, broadcast, gradient_row_statistics, gradient_ties
from tests.helpers.models import digits_batch, mlp

torch.set_num_threads(1)


def _three_layers(middle: float | None, head: float | None, middle_bias: float = 0.0) -> nn.Sequential:
    """64 -> 32 -> 32 -> 10 ReLU MLP; the middle and the head weights constant when given (biases as given)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    nn.init.kaiming_normal_(model[0].weight, nonlinearity="relu")
    if middle is not None:
        nn.init.constant_(model[2].weight, middle)
    nn.init.constant_(model[2].bias, middle_bias)
    if head is not None:
        nn.init.constant_(model[4].weight, head)
    return model


def test_units_identical_in_and_out_tie_their_gradients_and_are_an_error():
    # constant incoming rows and constant outgoing columns: every hidden unit gets the same gradient, forever
    report = diagnose(_three_layers(middle=0.05, head=0.05), digits_batch())
    (symmetric,) = report.by_code("init.symmetric")
    assert symmetric.severity == "error" and symmetric.modules == ("2",)
    assert symmetric.evidence["gradient_row_spread"] == 0.0


def test_a_constant_start_that_a_random_next_layer_separates_is_a_warning():
    report = diagnose(_three_layers(middle=0.05, head=None), digits_batch())
    (symmetric,) = report.by_code("init.symmetric")
    assert symmetric.severity == "warning" and symmetric.modules == ("2",)
    assert symmetric.evidence["gradient_row_spread"] > 0.0


def test_a_zero_start_that_the_gradient_separates_is_no_finding():
    # zero weights, a positive bias (the units are alive) and a random next layer: a deliberate zero start, as a
    # router or a gate; the first step's gradient already differs from unit to unit
    model = _three_layers(middle=0.0, head=None, middle_bias=0.1)
    assert "init.symmetric" not in diagnose(model, digits_batch()).codes


def test_a_zero_hidden_layer_whose_units_are_dead_is_still_an_error():
    model = mlp(4, 32, init="he")
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)  # relu(0) = 0 and relu'(0) = 0: no gradient reaches the weight at all
    (symmetric,) = diagnose(model, digits_batch()).by_code("init.symmetric")
    assert symmetric.severity == "error"


class _ExpandedWeight(nn.Module):
    """A random (d, d) weight applied per sample through a batch-``expand``ed view, as attention over learned
    queries broadcasts them: the view's leading axis repeats one weight, not identical units."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(64, 16)
        self.weight = nn.Parameter(torch.randn(16, 16) / 4)
        self.out = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))[:, None, :]
        mixed = torch.bmm(h, self.weight.expand(len(x), -1, -1)).squeeze(1)
        return self.out(torch.relu(mixed))


def test_rows_repeated_by_expand_are_no_evidence_of_a_symmetric_init():
    assert broadcast(torch.zeros(3).expand(4, 3)) and not broadcast(torch.zeros(4, 3))
    assert "init.symmetric" not in diagnose(_ExpandedWeight(), digits_batch()).codes


class _GateWithBias(nn.Module):
    """``torch.baddbmm(bias[:, None, :], x, W)`` per head (RecurrentGemma's gates): the weight, not the 3-D bias
    view added first, is what the layer applies."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(64, 32)
        self.gate_weight = nn.Parameter(torch.randn(4, 8, 8) / 8**0.5)
        self.gate_bias = nn.Parameter(torch.zeros(4, 8))
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = torch.relu(self.inp(x)).reshape(len(x), 4, 8).transpose(0, 1)  # (heads, batch, 8)
        gated = torch.baddbmm(self.gate_bias[:, None, :], heads, self.gate_weight)
        return self.out(torch.relu(gated).transpose(0, 1).reshape(len(x), 32))


def test_baddbmm_layer_is_its_weight_not_the_bias_added_first():
    report = diagnose(_GateWithBias(), digits_batch())
    names = [row["name"] for row in report.layers]
    assert "gate_weight" in names and "gate_bias" not in names
    assert "init.symmetric" not in report.codes


def test_gradient_rows_tie_within_float_rounding_only():
    tied = torch.ones(5, 3) * torch.tensor([1.0, -2.0, 3.0])
    spread, scale = gradient_row_statistics(tied).tolist()
    assert spread == 0.0 and scale == 3.0 and gradient_ties(spread, scale)
    assert gradient_ties(GRADIENT_TIE * 3.0, 3.0) and not gradient_ties(10 * GRADIENT_TIE * 3.0, 3.0)


class _PositionTable(nn.Module):
    """A zero-initialised table of per-position vectors, indexed by position and applied to the signal (as the
    relative-position tables of SAM-style attention are): a derived weight whose gradient is the table's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(64, 32)
        self.table = nn.Parameter(torch.zeros(7, 8))
        self.out = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x)).reshape(len(x), 4, 8)  # 4 positions of 8 features
        positions = torch.tensor([0, 2, 4, 6])
        scored = torch.einsum("bpd,pd->bp", h, self.table[positions])  # the rows of the table at those positions
        return self.out(torch.cat([torch.tanh(scored), h.mean(1)], -1))


class _RepeatedVector(nn.Module):
    """A learned per-dimension vector repeated once per sample and applied per sample (a pooling query): the
    repeated rows are copies of one vector, not units."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(64, 16)
        self.query = nn.Parameter(torch.zeros(16))
        self.out = nn.Linear(17, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        score = torch.bmm(h[:, None, :], self.query.repeat(len(x), 1)[:, :, None]).reshape(len(x), 1)
        return self.out(torch.cat([torch.tanh(score), h], -1))


def test_a_zero_table_indexed_per_position_is_judged_by_the_table_gradient():
    report = diagnose(_PositionTable(), digits_batch())
    assert "table" in [row["name"] for row in report.layers]
    assert "init.symmetric" not in report.codes


def test_a_vector_repeated_per_sample_has_copies_for_rows_not_units():
    report = diagnose(_RepeatedVector(), digits_batch())
    assert "query" in [row["name"] for row in report.layers]
    assert "init.symmetric" not in report.codes


class _ZeroLogitAttention(nn.Module):
    """Tokens -> one attention layer -> mean -> head. ``zero_key``: the key projection starts at zero too, so the
    attention logits are exactly 0 and neither the query nor the key gets any gradient (uniform attention)."""

    def __init__(self, zero_key: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)
        nn.init.zeros_(self.q.weight)
        nn.init.zeros_(self.q.bias)
        if zero_key:
            nn.init.zeros_(self.k.weight)
            nn.init.zeros_(self.k.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended = torch.nn.functional.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))
        return self.head(self.mlp(x + attended).mean(1))


def test_a_zero_query_is_no_finding_and_zero_logits_without_gradient_are_only_information():
    tokens = torch.randn(8, 12, 16, generator=torch.Generator().manual_seed(1))
    # a zero query (uniform attention at the start) against a random key: its gradient separates the rows
    assert "init.symmetric" not in diagnose(_ZeroLogitAttention(zero_key=False), tokens).codes
    # query and key both zero: the logits stay 0 and no gradient reaches either (SAM's zero relative-position
    # tables behind a vanishing tower look the same); the attention is uniform, the values still train: no error
    findings = diagnose(_ZeroLogitAttention(zero_key=True), tokens).by_code("init.symmetric")
    assert {f.modules for f in findings} == {("q",), ("k",)}
    assert all(f.severity == "info" and f.evidence["gradient_row_spread"] == 0.0 for f in findings)


def test_init_audit_fix_leaves_a_zero_attention_logit_term_alone_and_redraws_a_tied_hidden_layer():
    from lightning_gradstab.callbacks.init_audit import _fix_plan

    tokens = torch.randn(8, 12, 16, generator=torch.Generator().manual_seed(1))
    assert _fix_plan(diagnose(_ZeroLogitAttention(zero_key=True), tokens)) == []  # information only
    tied = _three_layers(middle=0.05, head=0.05)
    assert [name for name, _ in _fix_plan(diagnose(tied, digits_batch()))] == ["2"]
