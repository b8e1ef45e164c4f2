"""The logit watch (lightning_gradstab.logits) and the advisor's two findings from it: attention logit growth
(fix: qk-layernorm) and output logit divergence (fix: z-loss), Wortsman et al. 2023, on tiny models."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from examples.models import CharGPT
from lightning_gradstab import ArchitectureAdvisor
from lightning_gradstab.logits.rules import attention_logit_findings, collapse_logit, output_logit_findings
from lightning_gradstab.logits.sites import find_attention_sites, find_output_module
from lightning_gradstab.logits.watch import LogitWatch

VOCAB, LENGTH = 16, 32


def _data(generator: torch.Generator) -> torch.Tensor:
    return torch.randint(VOCAB, (400,), generator=generator).repeat(20)  # a repeated random "text"


def train(lr: float, qk_layernorm: bool, steps: int, z_loss: float = 0.0, push: float = 0.0) -> LogitWatch:
    """AdamW (0.9, 0.95), no warm-up, constant LR, a 1-layer char GPT; the watch measures every 5 steps.

    ``push`` adds ``-push * log Z`` to the loss: a force on the log-partition, the one direction the softmax
    cross-entropy is blind to (it is invariant to a shift of every logit), so nothing but a z-loss holds it."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = _data(generator)
    model = CharGPT(VOCAB, LENGTH, num_layers=1, num_heads=2, embed_dim=32, qk_layernorm=qk_layernorm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    watch = LogitWatch(model)
    for step in range(steps):
        starts = torch.randint(len(data) - LENGTH - 1, (16,), generator=generator)
        x = torch.stack([data[s : s + LENGTH] for s in starts])
        y = torch.stack([data[s + 1 : s + LENGTH + 1] for s in starts])
        watch.active = step % 5 == 0
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        log_partition = torch.logsumexp(logits, dim=-1)
        if push:
            loss = loss - push * log_partition.mean()
        if z_loss:
            loss = loss + z_loss * log_partition.square().mean()
        watch.record(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return watch


def test_attention_logit_growth_is_named_at_a_high_lr_with_the_max_logit_as_evidence():
    findings = {f.code: f for f in train(0.3, qk_layernorm=False, steps=60).findings()}
    growth = findings["attention.logit_growth"]
    assert growth.modules == ("blocks.0.attention",)
    assert growth.evidence["max_attention_logit"] > 256 > collapse_logit(LENGTH)
    assert "qk-layernorm" in growth.recommendation


def test_the_same_run_with_qk_layernorm_is_not_named():
    watch = train(0.3, qk_layernorm=True, steps=60)
    assert watch.qk_normalized == [True]
    assert "attention.logit_growth" not in {f.code for f in watch.findings()}


def test_nothing_fires_at_a_stable_lr():
    assert train(3e-3, qk_layernorm=False, steps=200).findings() == []


def test_output_logit_divergence_is_named_without_z_loss_and_not_with_it():
    # a push on log Z at a stable LR drifts it steadily, ~80 nats in 60 steps on every seed, CPU and thread
    # count tried (the rule's bar: 20); a z-loss of 1e-1 holds it at push / (2 z) = 1 nat (drift <= 2.4). A high LR
    # alone (1.0) also moves log Z by tens of nats, but chaotically: 0-50 nats by seed, CPU and thread count.
    drifting = {f.code: f for f in train(0.03, qk_layernorm=True, steps=60, push=0.2).findings()}
    assert drifting["output.logit_divergence"].evidence["drift_nats"] >= 40
    assert "z-loss" in drifting["output.logit_divergence"].recommendation
    pinned = train(0.03, qk_layernorm=True, steps=60, push=0.2, z_loss=1e-1).findings()
    assert "output.logit_divergence" not in {f.code for f in pinned}


def _reference_max_logit(q: torch.Tensor, k: torch.Tensor, heads: int) -> float:
    b, t, e = q.shape
    q, k = q.detach().double().view(b, t, heads, -1), k.detach().double().view(b, t, heads, -1)
    return float((torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(e // heads)).abs().max())


def test_multihead_attention_is_measured_exactly_from_its_in_projection():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    watch = LogitWatch(attention, sample_positions=100)
    x = torch.randn(2, 5, 8)
    watch.active = True
    attention(x, x, x)
    watch.record(0)
    w, b = attention.in_proj_weight, attention.in_proj_bias
    expected = _reference_max_logit(F.linear(x, w[:8], b[:8]), F.linear(x, w[8:16], b[8:16]), 2)
    assert watch.history()[1][0][0] == pytest.approx(expected, rel=1e-5)


class _HFStyle(nn.Module):
    def __init__(self, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads = 4, 2
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        if qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(4), nn.RMSNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x).sum() + self.k_proj(x).sum()


def test_hugging_face_style_modules_grouped_keys_and_qk_norms_are_recognised():
    model = nn.Sequential(_HFStyle(False), _HFStyle(True), nn.Linear(16, 3))
    sites = find_attention_sites(model)
    assert [(s.name, s.kind, s.num_heads, s.num_kv_heads, s.has_qk_norm) for s in sites] == [
        ("0", "separate", 4, 2, False), ("1", "separate", 4, 2, True)]
    assert find_output_module(model) is model[2]
    watch = LogitWatch(model[0])
    x = torch.randn(1, 6, 16)
    watch.active = True
    model[0](x)
    watch.record(0)
    k = model[0].k_proj(x).view(1, 6, 2, 4).repeat_interleave(2, dim=2).reshape(1, 6, 16)
    assert watch.history()[1][0][0] == pytest.approx(_reference_max_logit(model[0].q_proj(x), k, 4), rel=1e-5)


def test_unrecognised_modules_are_named_with_their_query_and_key_children_or_refused():
    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_queries, self.to_keys = nn.Linear(4, 4), nn.Linear(4, 4)

    model = nn.Sequential(Mixer())
    assert find_attention_sites(model) == []
    assert [s.name for s in find_attention_sites(model, {"0": ("to_queries", "to_keys")})] == ["0"]
    with pytest.raises(ValueError, match="not a recognised attention module"):
        find_attention_sites(model, ["0"])
    with pytest.raises(ValueError, match="not a module"):
        find_attention_sites(model, ["nope"])


def test_rules_on_synthetic_series():
    steps = list(range(0, 60, 10))
    growing = [[1.0], [50.0], [100.0], [300.0], [600.0], [900.0]]
    settled = [[1.0], [400.0], [400.0], [400.0], [400.0], [400.0]]
    assert attention_logit_findings(["a"], [False], steps, growing, 64)[0].modules == ("a",)
    assert attention_logit_findings(["a"], [True], steps, growing, 64) == []  # has the fix
    assert attention_logit_findings(["a"], [False], steps, settled, 64) == []  # large but not growing
    assert output_logit_findings(steps, [4.5, 4.0, 4.7, 5.0, 4.2, 4.9]) == []
    assert output_logit_findings(steps, [4.5, -2.0, -10.0, -20.0, -30.0, -40.0])[0].code == "output.logit_divergence"


def test_watch_state_round_trip_continues_the_history():
    watch = train(0.3, qk_layernorm=False, steps=30)
    state = watch.state_dict()
    model = CharGPT(VOCAB, LENGTH, num_layers=1, num_heads=2, embed_dim=32)
    resumed = LogitWatch(model)
    resumed.load_state_dict(state)
    assert resumed.history() == watch.history()
    with pytest.raises(ValueError, match="watched layers"):
        LogitWatch(CharGPT(VOCAB, LENGTH, num_layers=2, num_heads=2, embed_dim=32)).load_state_dict(state)


class _Task(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.network = CharGPT(VOCAB, LENGTH, num_layers=1, num_heads=2, embed_dim=32)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.network(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = _data(generator)
        starts = torch.randint(len(data) - LENGTH - 1, (640,), generator=generator)
        x = torch.stack([data[s : s + LENGTH] for s in starts])
        y = torch.stack([data[s + 1 : s + LENGTH + 1] for s in starts])
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def test_the_advisor_names_attention_logit_growth_with_evidence_and_resumes_its_watch(tmp_path):
    torch.manual_seed(0)
    advisor = ArchitectureAdvisor(observe_steps=50, logit_every_n_steps=5)  # still open: its state has the watch
    trainer = pl.Trainer(max_steps=40, callbacks=[advisor], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(_Task(lr=0.3))
    growth = advisor.report.by_code("attention.logit_growth")
    assert growth and growth[0].modules == ("network.blocks.0.attention",)
    assert growth[0].evidence["max_attention_logit"] > 256
    state = advisor.state_dict()["logit_watch"]
    assert state["steps"] == list(range(0, 40, 5))
    fresh = ArchitectureAdvisor(observe_steps=50)
    fresh.load_state_dict(advisor.state_dict())
    assert fresh.state_dict()["logit_watch"] == state
