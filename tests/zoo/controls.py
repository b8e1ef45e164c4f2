"""Known-bad models: the codes and modules each must get, and the fix its finding names.

Each :class:`Control` builds a model with one classic fault (from the papers the rules cite), lists the finding
codes that must appear with modules that must be named, and ``fix`` applies the change the finding recommends,
after which ``fixed`` codes must be gone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers as hf
from torch import Tensor, nn

from lightning_gradstab.diagnosis import reinitialize
from lightning_gradstab.report import Report
from tests.zoo.entry import generator, token_batch


def _mlp(depth: int, width: int, init: Callable[[Tensor], Any], activation: type[nn.Module] = nn.ReLU,
         batchnorm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    features = 64
    for _ in range(depth - 1):
        layers += [nn.Linear(features, width), *([nn.BatchNorm1d(width)] if batchnorm else []), activation()]
        features = width
    layers.append(nn.Linear(features, 10))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            init(layer.weight)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def _features(batch: int = 64) -> Tensor:
    return torch.randn(batch, 64, generator=generator())


def _linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _reinitialize_flagged(model: nn.Module, report: Report, code: str) -> nn.Module:
    """The fix ``init.*`` findings name: re-draw the flagged layers with their recommended scheme."""
    from lightning_gradstab.callbacks.init_audit import _fix_plan
    from lightning_gradstab.diagnosis.init_rules import InitScheme

    plan = [(name, scheme) for name, scheme in _fix_plan(report) if name in report.by_code(code)[0].modules]
    reinitialize(model, {n: InitScheme(*s) for n, s in plan if s}, [n for n, _ in plan], seed=0)
    return model


@dataclass(frozen=True)
class Control:
    """A known-bad model.

    Attributes:
        name: short id.
        build: returns ``(model, batch)``.
        fault: what is wrong, and the paper that shows it matters.
        expected: code -> modules that finding must name (all of them; more is allowed).
        fix: applies the fix the finding recommends: ``fix(model, report) -> fixed model``.
        fixed: the codes that must be gone after the fix.
    """

    name: str
    build: Callable[[], tuple[nn.Module, Any]]
    fault: str
    expected: dict[str, tuple[str, ...]]
    fix: Callable[[nn.Module, Report], nn.Module]
    fixed: tuple[str, ...]

    def __call__(self) -> tuple[nn.Module, Any]:
        torch.manual_seed(0)
        return self.build()


def sigmoid_std1() -> tuple[nn.Module, Tensor]:
    return _mlp(8, 64, lambda w: nn.init.normal_(w, 0.0, 1.0), nn.Sigmoid), _features()


def _sigmoid_to_relu_he(model: nn.Module, report: Report) -> nn.Module:
    """arch.activation's fix: ReLU with He init instead of the hidden sigmoids."""
    layers = [nn.ReLU() if isinstance(m, nn.Sigmoid) else m for m in model]
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    return nn.Sequential(*layers)


def xavier_relu_30() -> tuple[nn.Module, Tensor]:
    return _mlp(30, 64, nn.init.xavier_normal_), _features()


def he_relu_x2_20() -> tuple[nn.Module, Tensor]:
    return _mlp(20, 64, lambda w: nn.init.normal_(w, 0.0, 2 * (2 / w.shape[1]) ** 0.5)), _features()


def zero_hidden() -> tuple[nn.Module, Tensor]:
    model = _mlp(4, 64, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    nn.init.zeros_(model[2].weight)
    return model, _features()


def constant_hidden() -> tuple[nn.Module, Tensor]:
    model = _mlp(4, 64, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    nn.init.constant_(model[2].weight, 0.05)
    return model, _features()


def dead_relu() -> tuple[nn.Module, Tensor]:
    model = _mlp(4, 64, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    nn.init.constant_(model[2].bias, -10.0)
    return model, _features()


def _zero_flagged_bias(model: nn.Module, report: Report) -> nn.Module:
    """activation.dead's fix: zero bias on the layer feeding the dead activation."""
    nn.init.zeros_(model[2].bias)
    return model


def sigmoid_plain_10() -> tuple[nn.Module, Tensor]:
    return _mlp(10, 64, nn.init.xavier_normal_, nn.Sigmoid), _features()


def _add_batchnorm(model: nn.Module, report: Report) -> nn.Module:
    """arch.normalization's fix: BatchNorm1d after each hidden Linear, before its activation."""
    layers: list[nn.Module] = []
    for module in model:
        layers.append(module)
        if isinstance(module, nn.Linear) and module.out_features != 10:
            layers.append(nn.BatchNorm1d(module.out_features))
    return nn.Sequential(*layers)


class _VanillaRNN(nn.Module):
    def __init__(self, cell: type[nn.RNNBase] = nn.RNN) -> None:
        super().__init__()
        self.rnn = cell(8, 32, batch_first=True)
        self.head = nn.Linear(32, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def rnn_radius_2() -> tuple[nn.Module, Tensor]:
    model = _VanillaRNN()
    weight = torch.randn(32, 32, generator=generator(3))
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(weight * 2.0 / torch.linalg.eigvals(weight).abs().max())
    return model, torch.randn(8, 40, 8, generator=generator())


def _rnn_to_gru(model: nn.Module, report: Report) -> nn.Module:
    """arch.recurrent's fix: nn.GRU instead of the vanilla RNN."""
    return _VanillaRNN(nn.GRU)


class _PreLN(nn.Module):
    """Pre-LN Transformer LM whose embedding is used without a sqrt(d_model) scale."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, 64)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 128)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.encoder(self.embed(tokens))))


def tiny_embedding_pre_ln() -> tuple[nn.Module, Tensor]:
    return _PreLN(), token_batch(128)["input_ids"]


def _embedding_std_1(model: nn.Module, report: Report) -> nn.Module:
    """embedding.scale's fix: embeddings at std ~1."""
    nn.init.normal_(model.embed.weight, 0.0, 1.0)
    return model


def gpt2_init_x50() -> tuple[nn.Module, dict]:
    config = hf.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4, initializer_range=1.0)
    return hf.GPT2LMHeadModel(config), token_batch(128)


GPT2_LAYERS = (
    *(f"transformer.h.{i}.{part}" for i in range(2)
      for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    "lm_head",
)


def plain_bn_56() -> tuple[nn.Module, Tensor]:
    return _mlp(56, 32, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"), batchnorm=True), _features()


class _ResidualBN(nn.Module):
    """arch.residual's fix: the same 56 layers as x + block(x) pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(64, 32)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Linear(32, 32))
            for _ in range(27)
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _names(model_builder: Callable[[], tuple[nn.Module, Any]], select: Callable[[nn.Module], list[str]]) -> tuple:
    torch.manual_seed(0)
    return tuple(select(model_builder()[0]))


CONTROLS: list[Control] = [
    Control("xavier-relu-30", xavier_relu_30, "30-layer ReLU MLP with Xavier init stalls (He et al. 2015)",
            {"init.scale": _names(xavier_relu_30, lambda m: _linears(m)[:-1]), "signal.vanishing": ()},
            lambda m, r: _reinitialize_flagged(m, r, "init.scale"), ("init.scale", "signal.vanishing")),
    Control("relu-2x-he-20", he_relu_x2_20, "20-layer ReLU MLP at twice He's std: the signal grows 2x per layer",
            {"init.scale": _names(he_relu_x2_20, lambda m: _linears(m)[:-1]), "signal.exploding": ()},
            lambda m, r: _reinitialize_flagged(m, r, "init.scale"), ("init.scale", "signal.exploding")),
    Control("sigmoid-std1-8", sigmoid_std1, "8-layer sigmoid MLP at N(0, 1): saturated units (Glorot & Bengio 2010)",
            {"activation.saturated": (), "arch.activation": (), "init.scale": ()},
            _sigmoid_to_relu_he, ("arch.activation", "activation.saturated", "init.scale")),
    Control("sigmoid-plain-10", sigmoid_plain_10,
            "10-layer sigmoid MLP without normalization stays at chance (Ioffe & Szegedy 2015)",
            {"arch.normalization": (), "arch.activation": (), "signal.vanishing": ()},
            _add_batchnorm, ("arch.normalization",)),
    Control("zero-hidden", zero_hidden, "a zero-initialised hidden Linear: its units stay identical",
            {"init.symmetric": ("2",)}, lambda m, r: _reinitialize_flagged(m, r, "init.symmetric"),
            ("init.symmetric",)),
    Control("constant-hidden", constant_hidden, "a constant-initialised hidden Linear (0.05 everywhere)",
            {"init.symmetric": ("2",)}, lambda m, r: _reinitialize_flagged(m, r, "init.symmetric"),
            ("init.symmetric",)),
    Control("dead-relu-bias", dead_relu, "bias -10 before a ReLU: every unit dead on the batch",
            {"activation.dead": ("3",)}, _zero_flagged_bias, ("activation.dead",)),
    Control("rnn-radius-2", rnn_radius_2, "vanilla tanh RNN, recurrent spectral radius 2 (Pascanu et al. 2013)",
            {"arch.recurrent": ("rnn",)}, _rnn_to_gru, ("arch.recurrent",)),
    Control("pre-ln-tiny-embedding", tiny_embedding_pre_ln,
            "pre-LN Transformer, N(0, 0.02) embeddings without sqrt(d) scale (Takase et al. 2023, Spike No More)",
            {"embedding.scale": ("embed",)}, _embedding_std_1, ("embedding.scale",)),
    Control("gpt2-init-x50", gpt2_init_x50, "GPT-2 with initializer_range 1.0 (50x the default 0.02)",
            {"init.scale": GPT2_LAYERS}, lambda m, r: _reinitialize_flagged(m, r, "init.scale"), ("init.scale",)),
    Control("plain-bn-56", plain_bn_56, "56-layer plain MLP with BatchNorm degrades (He et al. 2016)",
            {"arch.residual": ()}, lambda m, r: _ResidualBN(), ("arch.residual",)),
]
