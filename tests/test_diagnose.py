"""``diagnose`` on real models and batches: the findings each classic failure must produce, and no others."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradstab import diagnose
from tests.helpers.models import (
    PreLNTransformer,
    ResidualMLP,
    SmallResNet,
    digits_batch,
    images,
    mlp,
    orthogonal_gru,
    sequences,
    tokens,
    vanilla_rnn,
)

torch.set_num_threads(1)


def test_xavier_relu_30_layers_gets_init_scale_naming_linears_with_he_and_signal_vanishing():
    model = mlp(30, 64, init="xavier")
    report = diagnose(model, digits_batch())
    (scale,) = report.by_code("init.scale")
    hidden_linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]
    assert list(scale.modules) == hidden_linears  # the output layer (Xavier is right for it) is not named
    assert "He/Kaiming" in scale.recommendation and scale.severity == "error"
    assert scale.evidence["predicted_signal_factor"] < 1e-3
    (vanishing,) = report.by_code("signal.vanishing")
    # He et al. 2015 (reproduced on digits): backprop delta layer1/layer30 is 3e-5..1e-7 under Xavier
    assert vanishing.evidence["delta_rms_first_over_last"] < 1e-4
    assert vanishing.evidence["per_layer_gain"] == pytest.approx(0.5**0.5, abs=0.05)  # chi1 = 1/2 per layer
    # ...while weight-gradient norms stay flat: why the rule reads activation gradients
    assert 0.3 < vanishing.evidence["weight_grad_first_over_last"] < 3
    assert "init.scale" in vanishing.recommendation


def test_he_relu_30_layers_gets_neither_init_scale_nor_signal_vanishing():
    report = diagnose(mlp(30, 64, init="he"), digits_batch())
    assert "init.scale" not in report.codes
    assert "signal.vanishing" not in report.codes
    assert report.layers[0]["recommended_std"] == pytest.approx((2 / 64) ** 0.5)


def test_sigmoid_10_layers_without_normalization_gets_signal_and_architecture_findings():
    report = diagnose(mlp(10, 100, init=0.1, activation=nn.Sigmoid), digits_batch())
    assert report.codes & {"signal.vanishing", "activation.saturated"}
    assert {"arch.normalization", "arch.activation"} <= report.codes
    assert "init.scale" not in report.codes  # N(0, 0.1^2) is Xavier for width 100: the activation is the cause
    (normalization,) = report.by_code("arch.normalization")
    assert normalization.evidence["plain_depth"] == 10


def test_sigmoid_10_layers_with_batchnorm_after_each_linear_gets_no_arch_normalization():
    report = diagnose(mlp(10, 100, init=0.1, activation=nn.Sigmoid, batchnorm=True), digits_batch())
    assert "arch.normalization" not in report.codes
    assert "arch.activation" not in report.codes


@pytest.mark.parametrize(
    ("model", "inputs"),
    [(ResidualMLP(), digits_batch()), (PreLNTransformer(), tokens()), (SmallResNet(), images())],
    ids=["residual-mlp", "pre-ln-transformer", "resnet-cnn"],
)
def test_residual_normalized_architectures_get_no_residual_or_normalization_advice(model, inputs):
    report = diagnose(model, inputs)
    assert not report.codes & {"arch.residual", "arch.normalization"}
    assert not [f for f in report.findings if f.severity == "error"]


def test_plain_56_layer_batchnorm_mlp_gets_arch_residual_but_not_normalization():
    report = diagnose(mlp(56, 32, init="he", batchnorm=True), digits_batch())
    (residual,) = report.by_code("arch.residual")
    assert residual.evidence["plain_depth"] == 56 and residual.evidence["skip_connections"] == 0
    assert "arch.normalization" not in report.codes
    # reproduced on digits: plain-56 BN at init has activation gradients exploding toward the input (~4.9e4)
    (exploding,) = report.by_code("signal.exploding")
    assert exploding.evidence["delta_rms_first_over_last"] > 1e3
    assert "arch.residual" in exploding.recommendation


def test_vanilla_tanh_rnn_with_radius_1_5_gets_arch_recurrent_with_the_radius():
    report = diagnose(vanilla_rnn(1.5), sequences())
    (recurrent,) = report.by_code("arch.recurrent")
    assert recurrent.modules == ("rnn",) and recurrent.severity == "error"
    assert recurrent.evidence["spectral_radius"] == pytest.approx(1.5, rel=1e-4)
    assert recurrent.evidence["sequence_length"] == 50
    assert "LSTM" in recurrent.recommendation and "GRU" in recurrent.recommendation
    assert "clip" in recurrent.recommendation


def test_orthogonal_gru_gets_no_recurrent_finding():
    report = diagnose(orthogonal_gru(), sequences())
    assert "arch.recurrent" not in report.codes


def _depthwise_separable(std: float | None) -> nn.Sequential:
    """A stem and four depthwise-separable blocks (3x3 depthwise, 1x1 pointwise, ReLU) without normalization, as
    an audio subsampler; every weight N(0, std), or He's per-group fan-in when ``std`` is None."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 32, 3, padding=1), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 32, 1), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if std is None:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")  # fan-in: per group for a grouped conv
            else:
                nn.init.normal_(module.weight, 0.0, std)
            nn.init.zeros_(module.bias)
    return model


def test_a_depthwise_convolution_is_judged_by_its_fan_out_per_group():
    # torch.nn.init counts a depthwise 3x3 conv's fan-out as 9 x 32 channels (pytorch/pytorch#23854): with that
    # count the accepted variances span 1/288..1/9 and N(0, 0.06) passes, though each depthwise layer multiplies
    # the signal by 3 x 0.06 = 0.18
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    (scale,) = diagnose(_depthwise_separable(0.06), images).by_code("init.scale")
    assert {"2", "5", "8", "11"} <= set(scale.modules)  # every depthwise layer named
    assert "init.scale" not in diagnose(_depthwise_separable(None), images).codes


def test_zero_initialised_hidden_linear_gets_init_symmetric():
    model = mlp(4, 32, init="he")
    nn.init.zeros_(model[2].weight)
    report = diagnose(model, digits_batch())
    (symmetric,) = report.by_code("init.symmetric")
    assert symmetric.modules == ("2",) and symmetric.evidence["row_spread"] == 0.0
    assert symmetric.severity == "error"


def test_zero_initialised_output_head_is_not_symmetric():
    model = mlp(4, 32, init="he")
    nn.init.zeros_(model[-1].weight)
    assert "init.symmetric" not in diagnose(model, digits_batch()).codes


def test_diagnose_leaves_parameters_buffers_modes_grads_and_rng_exactly_as_found():
    model = mlp(6, 32, init="xavier", batchnorm=True)
    model[2].eval()  # a mixed-mode model: one ReLU in eval, the rest in train
    model(digits_batch()).sum().backward()  # existing .grad and moved running statistics
    model[0].weight.grad = None  # a None grad must stay None
    state = {name: tensor.clone() for name, tensor in model.state_dict(keep_vars=True).items()}
    grads = {name: (p.grad.clone() if p.grad is not None else None) for name, p in model.named_parameters()}
    grad_objects = {name: p.grad for name, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    report = diagnose(model, digits_batch())

    assert report.layers  # the probe ran
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert torch.equal(tensor, state[name]), name  # bit for bit, BatchNorm running stats included
    for name, parameter in model.named_parameters():
        assert parameter.grad is grad_objects[name]
        if grads[name] is None:
            assert parameter.grad is None
        else:
            assert torch.equal(parameter.grad, grads[name]), name
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_diagnose_keeps_an_eval_model_in_eval_mode():
    model = mlp(4, 16, batchnorm=True).eval()
    diagnose(model, digits_batch())
    assert not any(m.training for m in model.modules())


def test_untraceable_model_gets_an_info_finding_not_an_exception():
    report = diagnose(torch.jit.script(mlp(3, 16)), digits_batch())
    (incomplete,) = report.by_code("trace.incomplete")
    assert incomplete.severity == "info"
    assert "ScriptModule" in incomplete.evidence["problem"]


def test_loss_fn_replaces_the_random_output_direction():
    x = digits_batch()
    labels = torch.arange(len(x)) % 10
    report = diagnose(mlp(4, 32), x, loss_fn=lambda logits: nn.functional.cross_entropy(logits, labels))
    assert all(row["grad_rms"] is not None for row in report.layers)


def test_inputs_as_tuple_and_mapping_reach_forward():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 8), nn.Linear(64, 8)

        def forward(self, x, y):
            return self.a(x) * self.b(y)

    x = digits_batch(16)
    assert len(diagnose(TwoInputs(), (x, x)).layers) == 2
    assert len(diagnose(TwoInputs(), {"x": x, "y": x}).layers) == 2


@pytest.mark.parametrize(
    ("model", "inputs", "error", "message"),
    [
        ("not a model", torch.randn(2, 64), TypeError, "`model` must be a torch.nn.Module, got str"),
        (nn.Linear(64, 2), 3.0, TypeError, "`inputs` must be a tensor"),
        (nn.Linear(64, 2), torch.randn(4, 9), ValueError, r"shapes \(4, 9\) do not fit Linear"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, inputs, error, message):
    with pytest.raises(error, match=message):
        diagnose(model, inputs)


def test_bad_loss_fn_raises_clear_errors():
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        diagnose(nn.Linear(64, 2), digits_batch(4), loss_fn="mse")
    with pytest.raises(ValueError, match="`loss_fn` must return a scalar tensor"):
        diagnose(nn.Linear(64, 2), digits_batch(4), loss_fn=lambda output: output)


def test_relu_units_silenced_by_a_negative_bias_get_activation_dead():
    model = mlp(4, 32, init="he")
    nn.init.constant_(model[2].bias, -10.0)  # the second hidden layer's units never fire
    (dead,) = diagnose(model, digits_batch()).by_code("activation.dead")
    assert dead.modules[0] == "3" and dead.evidence["max_dead_fraction"] == 1.0 and dead.severity == "error"


class _ZeroGainBranch(nn.Module):
    """An NFNet-style residual block (Brock et al. 2021): the branch's last convolution has a gain initialised to
    zero, and a squeeze-excitation after it (pool, 1x1 conv, ReLU, 1x1 conv, sigmoid gate) sees exactly zero."""

    def __init__(self, channels: int = 16, bias: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.gain = nn.Parameter(torch.zeros(channels, 1, 1))  # zero-init last gain
        self.fc1, self.fc2 = nn.Conv2d(channels, 4, 1), nn.Conv2d(4, channels, 1)
        nn.init.constant_(self.fc1.bias, bias)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        branch = self.conv2(x) * self.gain
        gate = torch.sigmoid(self.fc2(self.act(self.fc1(branch.mean((2, 3), keepdim=True)))))
        return self.head((x + branch * gate).mean((2, 3)))


def test_units_silent_only_because_no_signal_reaches_them_yet_are_not_dead():
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    # the zero gain silences the excitation's ReLU (its input is exactly 0): the gain's own gradient starts it
    assert "activation.dead" not in diagnose(_ZeroGainBranch(), images).codes
    # the same units pushed below zero by a bias get no gradient on any step: dead, and named
    (dead,) = diagnose(_ZeroGainBranch(bias=-1.0), images).by_code("activation.dead")
    assert dead.modules == ("act",) and dead.severity == "error"


def test_tanh_units_driven_into_their_tails_get_activation_saturated():
    report = diagnose(mlp(4, 64, init=1.0, activation=nn.Tanh), digits_batch())
    (saturated,) = report.by_code("activation.saturated")
    assert saturated.evidence["max_saturated_fraction"] > 0.5
    assert "init.scale" in report.codes  # std 1.0 is 8x Xavier's for width 64: the cause is named too


def test_tiny_embeddings_feeding_a_pre_ln_transformer_get_embedding_scale():
    model = PreLNTransformer()
    nn.init.normal_(model.embed.weight, 0.0, 0.02)  # GPT-2 style, without the sqrt(d_model) scale
    (embedding,) = diagnose(model, tokens()).by_code("embedding.scale")
    assert embedding.modules == ("embed",) and embedding.evidence["residual_stream_std"] < 0.1
    assert "embedding.scale" not in diagnose(PreLNTransformer(), tokens()).codes  # N(0, 1) default is fine


class _ValueEmbeddingBlocks(nn.Module):
    """Pre-LN blocks whose values get a per-token value embedding (modded-nanogpt, NeoMME) and are normalized
    before the output projection; the token embeddings are at std 1, the value embeddings at ``value_std``."""

    def __init__(self, value_std: float, vocab: int = 50, width: int = 32, blocks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.values = nn.Embedding(vocab, width), nn.Embedding(vocab, width)
        nn.init.normal_(self.values.weight, 0.0, value_std)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.value_projections = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.out_projections = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        stream, value_embedding = self.embed(tokens), self.values(tokens)
        for norm, value, out in zip(self.norms, self.value_projections, self.out_projections, strict=True):
            values = value(norm(stream)) + value_embedding
            stream = stream + out(nn.functional.normalize(values, dim=-1))
        return self.head(stream)


def test_value_embeddings_added_to_a_normalized_branch_are_no_residual_stream():
    # the sum (values + value embedding) is read through a normalization, but what is added to the embedding is
    # computed from another path, not from the embedding itself: x + f(norm(x)) is what makes a stream
    for value_std in (0.0, 0.02):
        assert "embedding.scale" not in diagnose(_ValueEmbeddingBlocks(value_std), tokens()).codes
    model = _ValueEmbeddingBlocks(0.02)
    nn.init.normal_(model.embed.weight, 0.0, 0.02)  # the token embeddings are the stream: still found
    (embedding,) = diagnose(model, tokens()).by_code("embedding.scale")
    assert embedding.modules == ("embed",)


class _ScaledResidualBlocks(nn.Module):
    """N(0, 0.02) token embeddings into blocks ``gain * x + f(norm(x))`` (pre-LN with a per-feature residual gain,
    as Doge's), or ``norm(x + f(x))`` (post-LN) with ``post_ln``."""

    def __init__(self, post_ln: bool, vocab: int = 50, width: int = 32, blocks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.branches = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.gains = nn.ParameterList(nn.Parameter(torch.ones(width)) for _ in range(blocks))
        self.head = nn.Linear(width, vocab)
        self.post_ln = post_ln

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        stream = self.embed(tokens)
        for norm, branch, gain in zip(self.norms, self.branches, self.gains, strict=True):
            stream = norm(stream + branch(stream)) if self.post_ln else gain * stream + branch(norm(stream))
        return self.head(stream)


def test_a_pre_ln_stream_with_a_residual_gain_is_a_stream_and_a_post_ln_one_is_not():
    (embedding,) = diagnose(_ScaledResidualBlocks(post_ln=False), tokens()).by_code("embedding.scale")
    assert embedding.modules == ("embed",)
    # Takase et al.'s mechanism is the pre-LN one (norm(x) amplifies the gradient of a tiny x); a post-LN
    # block's branch reads x itself, and its sum is normalized before the next block
    assert "embedding.scale" not in diagnose(_ScaledResidualBlocks(post_ln=True), tokens()).codes


class _PatchTower(nn.Module):
    """A SigLIP-style vision tower: a patch convolution at torch's default init plus a position table drawn
    N(0, ``position_std``) as an ``nn.Embedding``, then pre-LN MLP blocks."""

    def __init__(self, position_std: float, width: int = 32, blocks: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patches = nn.Conv2d(3, width, 4, stride=4)
        self.positions = nn.Embedding(16, width)
        nn.init.normal_(self.positions.weight, 0.0, position_std)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        stream = self.patches(images).flatten(2).transpose(1, 2) + self.positions(torch.arange(16))
        for norm, block in zip(self.norms, self.mlps, strict=True):
            stream = stream + block(norm(stream))
        return self.head(stream.mean(1))


def test_a_small_position_table_summed_with_patches_is_judged_by_the_stream_it_starts():
    # the stream is the sum: the patch projection at torch's default init sets its scale, not the table's 0.02
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert "embedding.scale" not in diagnose(_PatchTower(0.02), images).codes
    tiny = _PatchTower(0.02)
    nn.init.normal_(tiny.patches.weight, 0.0, 1e-4)  # patches that add nothing: the stream is the table's
    (finding,) = diagnose(tiny, images).by_code("embedding.scale")
    assert finding.modules == ("positions",) and finding.evidence["residual_stream_std"] < 0.1


def test_inplace_relu_gives_the_same_measurements_as_out_of_place():
    out_of_place, inplace = mlp(30, 64), mlp(30, 64)
    for module in inplace:
        if isinstance(module, nn.ReLU):
            module.inplace = True  # the Linear output is overwritten after the probe saw it
    rows = [diagnose(model, digits_batch()).layers for model in (out_of_place, inplace)]
    assert rows[0] == rows[1]


def test_data_dependent_forward_is_traced_from_the_real_pass():
    class Branching(nn.Module):  # torch.fx cannot trace the Python `if` on a tensor value
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(6))
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            for layer in self.layers:
                y = layer(x)
                x = torch.tanh(y) if y.mean() > 0 else y.sigmoid()
            return self.head(x)

    torch.manual_seed(0)
    report = diagnose(Branching(), digits_batch())
    assert {row["activation"] for row in report.layers[:-1]} <= {"tanh", "sigmoid"}
    assert report.layers[-1]["activation"] is None and "trace.incomplete" not in report.codes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_gets_the_same_findings_and_is_left_untouched():
    cpu_report = diagnose(mlp(30, 64, init="xavier", batchnorm=False), digits_batch())
    model = mlp(30, 64, init="xavier").cuda()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    cuda_rng = torch.cuda.get_rng_state()
    report = diagnose(model, digits_batch().cuda())
    assert {(f.code, f.modules) for f in report.findings} == {(f.code, f.modules) for f in cpu_report.findings}
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)


class _DictForward(nn.Module):
    """A model whose forward takes the whole batch dict (``forward(batch)``), as many training codebases do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(4, 32, init="he")

    def forward(self, batch):
        return self.net(batch["features"])


class _KeywordForward(_DictForward):
    """A model taking the batch as keyword arguments (``model(**batch)``, Hugging Face style)."""

    def forward(self, features, mask=None):
        return self.net(features)


@pytest.mark.parametrize("model_class", [_DictForward, _KeywordForward], ids=["forward(batch)", "forward(**batch)"])
def test_a_dict_batch_reaches_forward_as_one_dict_or_as_keywords(model_class):
    report = diagnose(model_class(), {"features": digits_batch(32), "mask": torch.ones(32)})
    assert [row["name"] for row in report.layers] == ["net.0", "net.2", "net.4", "net.6"]
    assert all(row["grad_rms"] is not None for row in report.layers)


def test_compiled_module_is_probed_on_its_eager_module_without_compiling():
    from torch._dynamo.utils import counters

    model = mlp(30, 64, init="xavier")
    compiled = torch.compile(model, backend="eager")
    counters.clear()
    report = diagnose(compiled, digits_batch())
    assert sum(counters["stats"].values()) == 0 and not counters["frames"]  # dynamo never ran
    assert report.by_code("init.scale")[0].modules == diagnose(model, digits_batch()).by_code("init.scale")[0].modules


def test_tied_parameters_are_not_reported_untraced():
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight  # named once, as embed.weight, used by head too

        def forward(self, tokens):
            return self.head(self.embed(tokens))

    assert "trace.incomplete" not in diagnose(TiedLM(), tokens()).codes


def test_a_parameter_the_forward_never_uses_is_not_a_tracing_gap():
    model = mlp(3, 16)
    model.register_parameter("mask_token", nn.Parameter(torch.zeros(16)))  # used only with masking
    assert "trace.incomplete" not in diagnose(model, digits_batch()).codes


def test_compiled_submodules_run_eagerly_in_the_probe_and_stay_compiled():
    from torch._dynamo.utils import counters

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.compile(mlp(30, 64, init="xavier"), backend="eager")

        def forward(self, x):
            return self.body(x)

    model = Wrapper()
    compiled_forward = model.body.forward
    counters.clear()
    report = diagnose(model, digits_batch())
    assert not counters["frames"]  # dynamo never ran
    assert len(report.by_code("init.scale")[0].modules) == 29  # the hooks saw every layer
    assert model.body.forward is compiled_forward


def test_dead_units_are_a_warning_past_half_the_width_plus_its_sampling_noise_and_an_error_past_90_percent():
    from lightning_gradstab.diagnosis.probe_results import ActivationProbe
    from lightning_gradstab.diagnosis.signal_rules import activation_findings

    def dead(fraction: float, units: int = 100) -> list[tuple[str, str]]:
        probe = ActivationProbe("relu", "relu", hidden=True, dead_fraction=fraction, units=units)
        return [(f.code, f.severity) for f in activation_findings([probe])]

    # 100 units: the threshold is 0.5 + 1/sqrt(100) = 0.6
    assert dead(0.59) == [] and dead(0.6) == [("activation.dead", "warning")]
    assert dead(0.9) == [("activation.dead", "error")]
    assert dead(0.55, units=10_000) == [("activation.dead", "warning")]  # 0.5 + 0.01


class _NumpyMasked(nn.Module):
    """A model that draws its training-time mask from NumPy's and Python's global generators (as Hugging Face
    speech encoders draw their span masks from ``numpy.random``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp(6, 32, init="he")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import random

        import numpy as np

        keep = torch.from_numpy(np.random.rand(x.shape[1]) > 0.2 * random.random()).to(x.dtype)
        return self.net(x * keep)


def test_numpy_and_python_random_masks_are_seeded_for_the_probe_and_left_as_found():
    import random

    import numpy as np

    model = _NumpyMasked()
    np.random.seed(123)
    random.seed(123)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    first = diagnose(model, digits_batch())
    np.random.rand(5)  # the global generators move between the two calls: the probe's draws do not
    random.random()
    second = diagnose(model, digits_batch())
    assert [row["grad_rms"] for row in first.layers] == [row["grad_rms"] for row in second.layers]
    np.random.seed(123)
    random.seed(123)
    diagnose(model, digits_batch())
    assert np.array_equal(np.random.get_state()[1], numpy_state[1]) and random.getstate() == python_state
