"""``arch.activation`` is about sigmoids *between* layers (a hidden activation, slope <= 1/4: Glorot & Bengio
2010); a sigmoid whose output only scores, routes or gates another path (DeepSeek-V3-style sigmoid routers, a
gated attention output) is no hidden activation, and a model full of them gets no finding."""

from __future__ import annotations

import torch
from torch import nn

from lightning_gradstab import diagnose
from tests.helpers.models import digits_batch, mlp

torch.set_num_threads(1)


class SigmoidRoutedExperts(nn.Module):
    """A residual block of top-2-of-4 experts chosen by sigmoid router scores (plus a balancing bias, used for
    the choice only), the chosen scores gathered and normalized, the tokens dispatched to their experts by
    sorting the choices (as sigmoid-scored mixture-of-experts layers do): the scores reach the experts as
    weights and, through the sorted choices, as indices; never as an expert's input."""

    def __init__(self, width: int = 32, experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(width, experts)
        self.register_buffer("balance", torch.zeros(experts))
        self.experts = nn.ModuleList([nn.Linear(width, width) for _ in range(experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(self.router(x))
        chosen = (scores + self.balance).topk(2, dim=-1).indices
        weights = scores.gather(-1, chosen)
        weights = weights / weights.sum(-1, keepdim=True)
        flat_choice, order = chosen.reshape(-1).sort()
        tokens = x[order // 2]
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            picked = flat_choice == index
            out[picked] = torch.relu(expert(tokens[picked]))
        combined = torch.zeros_like(x).index_add_(0, order // 2, out * weights.reshape(-1)[order, None])
        return x + combined


def test_sigmoid_routers_are_no_hidden_activation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), SigmoidRoutedExperts(), SigmoidRoutedExperts(), nn.Linear(32, 10))
    assert "arch.activation" not in diagnose(model, digits_batch()).codes


def test_sigmoids_between_layers_are_still_named():
    report = diagnose(mlp(6, 32, init="xavier", activation=nn.Sigmoid), digits_batch())
    (finding,) = report.by_code("arch.activation")
    assert finding.evidence["hidden_sigmoid_layers"] >= 2


class _PooledEncoder(nn.Module):
    """Pre-LN MLP blocks over 512 tokens that return the tokens and an attention pooling of them: a learned query
    attends over the sequence (SigLIP's and AIMv2's heads), so the key and value projections get ~1/512 of the
    pooled output's gradient per token, while the stream also gets the tokens' own."""

    def __init__(self, width: int = 32, blocks: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)) for _ in range(blocks)
        )
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.k, self.v, self.out = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x)
        for norm, block in zip(self.norms, self.mlps, strict=True):
            h = h + block(norm(h))
        query = self.query.expand(x.shape[0], -1, -1)
        pooled = torch.nn.functional.scaled_dot_product_attention(query, self.k(h), self.v(h))
        return h, self.out(pooled)


def test_the_key_and_value_of_an_attention_pooling_are_a_head_not_a_point_of_the_signal_path():
    tokens = torch.randn(4, 512, 8, generator=torch.Generator().manual_seed(1))
    report = diagnose(_PooledEncoder(), tokens)
    assert not {"signal.exploding", "signal.vanishing"} & report.codes
    rows = {row["name"]: row for row in report.layers}
    assert rows["v"]["grad_rms"] < rows["mlps.1.2"]["grad_rms"] / 50  # the pooled gradient, ~1/512 per token


class _AttentivePooler(_PooledEncoder):
    """The same encoder read only through an attention pooling whose learned query passes a projection first, then
    a pre-LN MLP block on the pooled token and a classifier (V-JEPA 2's attentive pooler): every point past the
    pooling gets the whole gradient, every token before it ~1/512 of it."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.pooled_norm = nn.LayerNorm(32)
        self.pooled_mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = self.embed(x)
        for norm, block in zip(self.norms, self.mlps, strict=True):
            h = h + block(norm(h))
        query = self.q(self.query.expand(x.shape[0], -1, -1))  # the first argument of the pooling is now traced
        pooled = self.out(torch.nn.functional.scaled_dot_product_attention(query, self.k(h), self.v(h)))
        pooled = pooled + self.pooled_mlp(self.pooled_norm(pooled))
        return self.classifier(pooled)


def test_points_past_an_attention_pooling_are_not_compared_with_the_tokens_before_it():
    # an attention pooling pools positions as a mean does: comparing the tokens' delta with the pooled token's
    # measures the 512 positions, not a depth effect (a signal.vanishing warning before)
    tokens = torch.randn(4, 512, 8, generator=torch.Generator().manual_seed(1))
    report = diagnose(_AttentivePooler(), tokens)
    assert not {"signal.exploding", "signal.vanishing"} & report.codes
