"""Diagnosis v3: depth counted where weights are applied, reference points that measure propagation, the user's
inputs never changed, and one verdict per model and batch (``diagnose``, ``InitAudit``, the advisor's first look)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_gradstab import ArchitectureAdvisor, InitAudit, diagnose
from lightning_gradstab.cli import EXIT_MODEL, main
from lightning_gradstab.diagnosis import ProbeError, could_not_probe, trace
from tests.helpers.trainers import quiet_trainer

pytest.importorskip("transformers", reason="the wider zoo builds Hugging Face models from configs (the dev extra)")

from tests.zoo import BROKEN, CONTROLS, GOOD, STOCK
from tests.zoo.applied import APPLIED
from tests.zoo.wider import GOOD_WIDER, STOCK_WIDER, Scale, wav2vec2

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*token_id.*")


def _ids(entries):
    return [entry.name for entry in entries]


def _features(batch: int = 32) -> Tensor:
    return torch.randn(batch, 64, generator=torch.Generator().manual_seed(3))


def test_the_wider_zoo_has_20_stock_architectures_7_deliberate_inits_and_10_applied_weight_controls():
    assert len(STOCK_WIDER) >= 20 and len(GOOD_WIDER) >= 7 and len(APPLIED) >= 10


@pytest.mark.parametrize("entry", STOCK_WIDER, ids=_ids(STOCK_WIDER))
def test_wider_stock_model_gets_no_error_and_only_warnings_a_paper_backs(entry):
    report = diagnose(*entry())
    assert not report.has_errors, [(f.code, f.modules) for f in report.findings if f.severity == "error"]
    warned = {f.code for f in report.findings if f.severity == "warning"}
    assert warned <= set(entry.expected), f"{entry.name}: uncited warnings {warned - set(entry.expected)}"
    assert not could_not_probe(report)


@pytest.mark.parametrize("entry", GOOD_WIDER, ids=_ids(GOOD_WIDER))
def test_deliberate_init_from_the_literature_gets_nothing_above_info(entry):
    report = diagnose(*entry())
    assert all(f.severity == "info" for f in report.findings), [(f.severity, f.code) for f in report.findings]


@pytest.mark.parametrize("control", APPLIED, ids=_ids(APPLIED))
def test_weights_applied_in_forward_are_counted_per_application_and_named(control):
    report = diagnose(*control())
    for code, modules in control.expected.items():
        assert code in report.codes, f"{control.name}: {code} missing from {sorted(report.codes)}"
        named = {m for f in report.by_code(code) for m in f.modules}
        assert set(modules) <= named, f"{control.name}: {code} does not name {set(modules) - named}"


@pytest.mark.parametrize("control", [c for c in APPLIED if c.fixed], ids=_ids([c for c in APPLIED if c.fixed]))
def test_redrawing_the_weights_init_scale_names_clears_the_applied_weight_control(control):
    model, batch = control()
    fixed = control.fix(model, diagnose(model, batch))
    assert not set(control.fixed) & diagnose(fixed, batch).codes


# ---- never change the user's inputs ----

def test_speech_encoder_that_sets_requires_grad_on_its_input_view_is_probed_and_its_input_left_alone():
    model, batch = wav2vec2()
    report = diagnose(model, batch)
    assert not could_not_probe(report) and report.layers
    assert not batch["input_values"].requires_grad and batch["input_values"].grad_fn is None
    assert all(row["grad_rms"] for row in report.layers if row["name"].endswith("conv_layers.0.conv"))


def test_a_model_whose_own_forward_raises_gets_probe_error_with_the_real_cause():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 8)

        def forward(self, x: Tensor) -> Tensor:
            raise KeyError("the model's own bug")

    with pytest.raises(ProbeError, match=r"KeyError: .the model's own bug"):
        diagnose(Broken(), _features())


class RefusesTracing(nn.Module):
    """Runs normally, but raises under a ``TorchFunctionMode`` (as some custom kernels do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 8)

    def forward(self, x: Tensor) -> Tensor:
        if torch._C._is_torch_function_mode_enabled():
            raise RuntimeError("custom kernel: no function modes")
        return self.fc(x)


def refuses_tracing() -> tuple[nn.Module, Tensor]:
    return RefusesTracing(), _features()


def test_a_model_the_probe_cannot_measure_gets_trace_incomplete_with_the_cause_and_the_cli_exits_3(tmp_path):
    report = diagnose(*refuses_tracing())
    (incomplete,) = report.by_code("trace.incomplete")
    assert could_not_probe(report) and "custom kernel: no function modes" in incomplete.evidence["problem"]
    assert main(["audit", "tests.test_diagnosis_v3:refuses_tracing", "--json", str(tmp_path / "a.json")]) == EXIT_MODEL


# ---- deliberate scalings are not depth ----

class AffineSkipNet(nn.Module):
    """15 conv-BN-ReLU residual blocks whose skip path passes a per-channel ``scale * x + bias`` module."""

    def __init__(self, blocks: int = 15, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(blocks))
        self.affines = nn.ModuleList(AffineChannels(channels) for _ in range(blocks))
        self.head = nn.Linear(channels, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for conv, norm, affine in zip(self.convs, self.norms, self.affines, strict=True):
            x = affine(x) + F.relu(norm(conv(x)))
        return self.head(x.mean((2, 3)))


class AffineChannels(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.ones(channels, 1, 1)), nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x + self.bias


def test_affine_blocks_on_the_skip_path_are_scalings_not_layers():
    model, x = AffineSkipNet(), torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    graph, _ = trace(model, model, inputs=x)
    assert graph.layer("affines.0") is None and graph.plain_depth <= 3
    assert "arch.residual" not in diagnose(model, x).codes


class ResidualScaling(nn.Module):
    """ZAYA's residual add: per-feature gains and biases on the branch and on the stream, then their sum."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.branch_scale, self.branch_bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.stream_scale, self.stream_bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))

    def forward(self, branch: Tensor, stream: Tensor) -> Tensor:
        return (branch + self.branch_bias) * self.branch_scale + (stream + self.stream_bias) * self.stream_scale


class ScaledResidualMLP(nn.Module):
    """16 pre-LN ReLU MLP blocks whose skip connection is the add inside :class:`ResidualScaling`."""

    def __init__(self, blocks: int = 16, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width)) for _ in range(blocks)
        )
        self.adds = nn.ModuleList(ResidualScaling(width) for _ in range(blocks))
        self.head = nn.Linear(width, 4)

    def forward(self, x: Tensor) -> Tensor:
        stream = self.embed(x)
        for norm, mlp, add in zip(self.norms, self.mlps, self.adds, strict=True):
            stream = add(mlp(norm(stream)), stream)
        return self.head(stream)


def test_a_module_that_adds_two_signal_paths_with_per_feature_gains_is_a_skip_connection_not_a_scaling():
    # the behaviour tests vary the first argument only: a sum of two paths reads there as an affine map of one,
    # and the skip connection inside vanished from the graph (32 layers read as a plain stack)
    torch.manual_seed(0)
    model, x = ScaledResidualMLP(), torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    graph, _ = trace(model, model, inputs=x)
    joins = [node for node in graph.nodes if node.kind == "join" and not node.in_branch]
    assert len(joins) >= 16 and graph.plain_depth <= 4
    assert graph.layer("mlps.0.0").in_branch and graph.layer("mlps.15.2").in_branch
    assert "arch.residual" not in diagnose(model, x).codes


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated RMSNorm: ``norm(x * silu(gate)) * weight``, two signal inputs, one per-feature weight."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        x = x * F.silu(gate)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_a_normalization_of_its_first_input_is_one_node_however_many_paths_it_takes():
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.gate, self.out = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)
            self.norm = GatedRMSNorm(16)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.norm(self.inner(x), self.gate(x)))

    model = Gated()
    graph, _ = trace(model, model, inputs=torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    norms = [node for node in graph.nodes if node.kind == "norm"]
    assert [node.name for node in norms] == ["norm"]


class LayerScaleBlocks(nn.Module):
    """Pre-LN MLP blocks with LayerScale 1e-6, as a ``Scale`` module or inline, classified from the class token."""

    def __init__(self, as_module: bool, blocks: int = 4) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(64) for _ in range(blocks))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)) for _ in range(blocks)
        )
        self.scales = nn.ModuleList(Scale(torch.full((64,), 1e-6)) for _ in range(blocks))
        self.head = nn.Linear(64, 10)
        self.as_module = as_module

    def forward(self, tokens: Tensor) -> Tensor:
        for norm, mlp, scale in zip(self.norms, self.mlps, self.scales, strict=True):
            branch = mlp(norm(tokens))
            tokens = tokens + (scale(branch) if self.as_module else scale.gamma * branch)
        return self.head(tokens[:, 0])


def test_layerscale_as_a_module_gets_the_same_verdict_as_layerscale_inline():
    tokens = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0))
    verdicts = []
    for as_module in (True, False):
        torch.manual_seed(0)
        report = diagnose(LayerScaleBlocks(as_module), tokens)
        verdicts.append(sorted((f.code, f.severity) for f in report.findings))
    assert verdicts[0] == verdicts[1]
    assert all(severity == "info" for _, severity in verdicts[0])


# ---- reference points that measure propagation ----

class PooledHead(nn.Module):
    """A He-initialised conv stack, a global average pool over 32x32 positions, a 3-layer MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1) for i in range(4))
        self.mlp = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 10)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        x = x.mean((2, 3))
        for layer in self.mlp:
            x = F.relu(layer(x))
        return self.head(x)


def test_deltas_are_not_compared_across_a_global_pool():
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    report = diagnose(PooledHead(), x)
    assert not {"signal.vanishing", "signal.exploding"} & report.codes  # the pool divides by 1024, not the depth


class SoftcappedAveragedHeads(nn.Module):
    """A He MLP whose two heads are averaged and softcapped, ``30 * tanh(mean / 30)``, and a loss in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.ReLU())])
        self.head_a, self.head_b = nn.Linear(64, 10), nn.Linear(64, 10)
        for module in self.body:
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.body(x)
        logits = 30.0 * torch.tanh((self.head_a(hidden) + self.head_b(hidden)) / 2 / 30.0)
        return logits, (logits - target).pow(2).mean()


def test_softcapped_averaged_heads_and_an_in_forward_loss_are_output_layers_not_references_or_skips():
    x, target = _features(), torch.randn(32, 10, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    model = SoftcappedAveragedHeads()
    graph, _ = trace(model, lambda batch: model(*batch), inputs=(x, target))
    assert graph.layer("head_a").is_output and graph.layer("head_b").is_output
    assert graph.skip_connections == 0  # logits - target is a loss, not a skip from the input
    report = diagnose(model, (x, target))
    assert not report.findings, [(f.code, f.modules) for f in report.findings]


class PositionBiasAttention(nn.Module):
    """Attention whose bias comes from an MLP over a constant coordinate table, ``16 * sigmoid`` (Swin v2)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("coords", torch.linspace(-1, 1, 16 * 16 * 2).reshape(16, 16, 2))
        self.bias_mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
        self.qkv, self.out = nn.Linear(64, 192), nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        bias = 16 * torch.sigmoid(self.bias_mlp(self.coords).squeeze(-1))
        weights = torch.softmax(q @ k.transpose(1, 2) / 8 + bias, dim=-1)
        return self.head((x + self.out(weights @ v)).mean(1))


def test_a_position_bias_mlp_over_constant_coordinates_is_off_the_signal_path():
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0))
    model = PositionBiasAttention()
    graph, _ = trace(model, model, inputs=x)
    assert not graph.layer("bias_mlp.2").on_signal_path
    assert "arch.activation" not in diagnose(model, x).codes


def test_growth_through_a_plain_batchnorm_stack_is_a_warning_never_an_error():
    control = next(c for c in CONTROLS if c.name == "plain-bn-56")
    report = diagnose(*control())
    assert {f.severity for f in report.by_code("signal.exploding")} == {"warning"}
    assert "arch.residual" in report.codes


# ---- one verdict per model and batch ----

class Wrapped(pl.LightningModule):
    """A zoo model in a training step whose loss is not diagnose's direction (mean square of the outputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        if isinstance(batch, dict):
            output = self.model(**batch)
        elif isinstance(batch, (tuple, list)):
            output = self.model(*batch)
        else:
            output = self.model(batch)
        tensors = [t for t in torch.utils._pytree.tree_leaves(output)
                   if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad]
        return sum(t.float().pow(2).mean() for t in tensors)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


AGREEMENT = STOCK + BROKEN + GOOD + STOCK_WIDER + GOOD_WIDER + list(CONTROLS) + list(APPLIED)


def _verdict(report, prefix: str = "") -> list[tuple[str, str, tuple[str, ...]]]:
    """Each finding's code, severity and modules (named from the model, without the LightningModule's prefix)."""
    return sorted((f.code, f.severity, tuple(m.removeprefix(prefix) for m in f.modules)) for f in report.findings)


@pytest.mark.parametrize("entry", AGREEMENT, ids=_ids(AGREEMENT))
def test_init_audit_the_advisors_first_look_and_diagnose_give_one_verdict(entry):
    model, batch = entry()
    expected = _verdict(diagnose(model, batch))
    audit, advisor = InitAudit(), ArchitectureAdvisor(observe_steps=10)
    loader = DataLoader([batch], batch_size=None, collate_fn=lambda item: item)
    quiet_trainer(max_steps=1, callbacks=[audit, advisor]).fit(Wrapped(model), loader)
    assert _verdict(audit.report, "model.") == expected
    assert _verdict(advisor.first_look, "model.") == expected


def test_einsum_attention_at_std_1_is_sent_to_init_scale_on_its_projections_not_to_clipping():
    control = next(c for c in APPLIED if c.name == "einsum-attention-std1")
    (exploding,) = diagnose(*control()).by_code("signal.exploding")
    assert "init.scale" in exploding.recommendation and "clip" not in exploding.recommendation


def test_the_advisors_gradient_trend_never_compares_a_query_projection_with_the_classifier():
    from lightning_gradstab.diagnosis.training_rules import gradient_findings
    from tests.zoo.wider import bert_sequence_classification_with_labels

    model, batch = bert_sequence_classification_with_labels()
    graph, _ = trace(model, lambda inputs: model(**inputs), inputs=batch)
    norms = {layer.name: 1.0 for layer in graph.layers if layer.kind != "embedding"}
    norms["bert.encoder.layer.0.attention.self.query"] = 3e-4  # a near-uniform softmax: small by construction
    assert gradient_findings(graph, norms, optimizer_steps=10) == []  # before: query over classifier, vanishing


def test_a_forward_hook_that_replaces_an_output_is_traced_after_the_module_s_own_hooks():
    """The trace records what the next layer receives: a user's hook that rescales one layer's output changes the
    measured signal, not the init's predicted factor (global module hooks, which torch runs before a module's
    own, recorded the output before the user's hook)."""

    def build(hooked: bool) -> nn.Module:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(16):
            linear = nn.Linear(64, 64)
            nn.init.normal_(linear.weight, std=0.3 / 8)
            layers += [linear, nn.Tanh()]
        net = nn.Sequential(*layers, nn.Linear(64, 10))
        if hooked:
            net[6].register_forward_hook(lambda module, inputs, output: output * 10.0)
        return net

    batch = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    plain, hooked = (
        {f.code: f for f in diagnose(build(h), batch).findings} for h in (False, True)
    )
    factor = "predicted_signal_factor"
    assert hooked["init.scale"].evidence[factor] == plain["init.scale"].evidence[factor]
    measured = "delta_rms_first_over_last"
    ratio = hooked["signal.vanishing"].evidence[measured] / plain["signal.vanishing"].evidence[measured]
    assert 5.0 < ratio < 20.0  # the x10 the next layer really receives
