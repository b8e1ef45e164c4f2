"""Broken models where depth is *applications of weights*, not modules (diagnosis v3's bad controls).

Each is a classic init fault (He et al. 2015: the signal scales by ``sqrt(fan * Var[w] / 2)`` per ReLU layer, so
half He's std shrinks it 2x per layer and twice He's grows it 2x) written in a style a module walk cannot see:
``F.linear`` over a ``ParameterList``, one ``nn.Linear`` applied many times, a stacked 3-D weight indexed per
layer, ``x @ W`` and ``einsum`` on raw parameters, ``torch.addmm``, ``bmm`` over stacked experts, a block list run
several times, ``F.conv2d`` over parameters. Each lists the codes a correct report must give and the modules
(weights, as the layer table names them) those findings must name; ``fix`` re-draws what ``init.scale`` names
with its recommended scheme, after which the codes in ``fixed`` must be gone.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tests.zoo.controls import Control, _reinitialize_flagged
from tests.zoo.entry import generator

WIDTH = 64


def _he(fan_in: int, factor: float) -> float:
    return factor * (2.0 / fan_in) ** 0.5


def _features(batch: int = 64) -> Tensor:
    return torch.randn(batch, WIDTH, generator=generator())


class ParameterListMLP(nn.Module):
    """A ReLU net written as ``F.linear`` over a ``ParameterList`` (no Linear modules at all)."""

    def __init__(self, depth: int, std: float) -> None:
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.randn(WIDTH, WIDTH) * std) for _ in range(depth))
        self.head = nn.Parameter(torch.randn(10, WIDTH) * WIDTH**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        for weight in self.w:
            x = F.relu(F.linear(x, weight))
        return F.linear(x, self.head)


def parameter_list_32() -> tuple[nn.Module, Tensor]:
    # Xavier's std before ReLU (1/sqrt(64)): 2^-0.5 per layer, 32 layers ~ 1.5e-5
    return ParameterListMLP(32, WIDTH**-0.5), _features()


class ReusedLinear(nn.Module):
    """One ``nn.Linear`` applied ``times`` times (weight sharing across depth), then a head."""

    def __init__(self, times: int, std: float) -> None:
        super().__init__()
        self.body = nn.Linear(WIDTH, WIDTH)
        nn.init.normal_(self.body.weight, std=std)
        nn.init.zeros_(self.body.bias)
        self.head = nn.Linear(WIDTH, 10)
        self.times = times

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(self.times):
            x = F.relu(self.body(x))
        return self.head(x)


def reused_linear_24() -> tuple[nn.Module, Tensor]:
    return ReusedLinear(24, _he(WIDTH, 0.5)), _features()


class StackedWeights(nn.Module):
    """One 3-D parameter holding every layer's weight, indexed per layer: ``x @ W[i].T``."""

    def __init__(self, depth: int, std: float) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(depth, WIDTH, WIDTH) * std)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: Tensor) -> Tensor:
        for index in range(self.W.shape[0]):
            x = torch.relu(x @ self.W[index].T)
        return self.head(x)


def stacked_weights_20() -> tuple[nn.Module, Tensor]:
    return StackedWeights(20, _he(WIDTH, 0.5)), _features()


class EinsumAttention(nn.Module):
    """Pre-LN attention blocks on raw ``(d, d)`` parameters applied with ``einsum``, all drawn at std 1."""

    def __init__(self, blocks: int = 4, width: int = WIDTH) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (
            nn.ParameterList(nn.Parameter(torch.randn(width, width)) for _ in range(blocks)) for _ in range(4)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.head = nn.Linear(width, 10)
        self.scale = width**-0.5

    def forward(self, x: Tensor) -> Tensor:
        for q, k, v, o, norm in zip(self.q, self.k, self.v, self.o, self.norms, strict=True):
            h = norm(x)
            queries, keys = torch.einsum("bsd,de->bse", h, q), torch.einsum("bsd,de->bse", h, k)
            values = torch.einsum("bsd,de->bse", h, v)
            weights = torch.softmax(torch.einsum("bse,bte->bst", queries, keys) * self.scale, dim=-1)
            x = x + torch.einsum("bse,ed->bsd", torch.einsum("bst,bte->bse", weights, values), o)
        return self.head(x.mean(1))


def einsum_attention_std1() -> tuple[nn.Module, Tensor]:
    return EinsumAttention(), torch.randn(4, 16, WIDTH, generator=generator())


class RawMatmul(nn.Module):
    """``x @ W`` with ``W`` stored ``(in, out)`` (the transpose of ``nn.Linear``'s layout)."""

    def __init__(self, widths: list[int], std: float) -> None:
        super().__init__()
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(a, b) * _he(a, std)) for a, b in pairwise(widths)
        )

    def forward(self, x: Tensor) -> Tensor:
        for index, weight in enumerate(self.weights):
            x = x @ weight
            if index < len(self.weights) - 1:
                x = F.relu(x)
        return x


def matmul_double_he_12() -> tuple[nn.Module, Tensor]:
    # widths 64 -> 256 -> 64 ...: the fan-in is the first axis here; twice He's std grows the signal 2x per layer.
    # On the 256 -> 64 layers twice the fan-in std equals He's fan_out form (accepted, He et al. 2015 sec. 2.2),
    # so init.scale must name the 64 -> 256 ones; the last one (weights.15 of addmm) is the output, small on purpose
    widths = [WIDTH] + [256 if i % 2 == 0 else WIDTH for i in range(11)] + [10]
    return RawMatmul(widths, 2.0), _features()


class AddmmChain(nn.Module):
    """``torch.addmm(bias, x, W)`` per layer (GPT-2's Conv1D style, written inline)."""

    def __init__(self, depth: int, std: float) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(WIDTH, WIDTH) * std) for _ in range(depth))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(WIDTH)) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for weight, bias in zip(self.weights, self.biases, strict=True):
            x = F.relu(torch.addmm(bias, x, weight))
        return x.mean(-1, keepdim=True)


def addmm_half_he_16() -> tuple[nn.Module, Tensor]:
    return AddmmChain(16, _he(WIDTH, 0.5)), _features()


class BlocksRunTwice(nn.Module):
    """A ``ModuleList`` of 6 Linear+ReLU layers run 4 times over (24 applications), torch's default init."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(6))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(4):
            for layer in self.layers:
                x = F.relu(layer(x))
        return self.head(x)


def blocks_run_4_times() -> tuple[nn.Module, Tensor]:
    # torch's default Linear init has Var = 1/(3 fan_in): sqrt(1/6) per ReLU layer, 24 applications ~ 5e-10
    return BlocksRunTwice(), _features()


class BmmExperts(nn.Module):
    """Every token through each of 4 experts with ``torch.bmm`` over a stacked ``(E, in, out)`` weight, 8 layers."""

    def __init__(self, depth: int = 8, experts: int = 4, std: float = 1.0) -> None:
        super().__init__()
        self.experts = nn.ParameterList(nn.Parameter(torch.randn(experts, WIDTH, WIDTH) * std) for _ in range(depth))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.unsqueeze(0).expand(self.experts[0].shape[0], -1, -1)
        for weight in self.experts:
            tokens = F.relu(torch.bmm(tokens, weight))
        return self.head(tokens.mean(0))


def bmm_experts_std1() -> tuple[nn.Module, Tensor]:
    return BmmExperts(), _features()


class FunctionalConvs(nn.Module):
    """A plain ReLU conv stack written as ``F.conv2d`` over a ``ParameterList``."""

    def __init__(self, depth: int, factor: float, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.kernels = nn.ParameterList(
            nn.Parameter(torch.randn(channels, channels, 3, 3) * _he(channels * 9, factor)) for _ in range(depth)
        )
        self.head = nn.Linear(channels, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        for kernel in self.kernels:
            x = F.relu(F.conv2d(x, kernel, padding=1))
        return self.head(x.mean((2, 3)))


def functional_conv_double_he_12() -> tuple[nn.Module, Tensor]:
    return FunctionalConvs(12, 2.0), torch.randn(4, 3, 16, 16, generator=generator())


class EinsumMLP(nn.Module):
    """A ReLU MLP written as ``einsum('bi,io->bo', x, W)`` on raw parameters."""

    def __init__(self, depth: int, std: float) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(WIDTH, WIDTH) * std) for _ in range(depth))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: Tensor) -> Tensor:
        for weight in self.weights:
            x = F.relu(torch.einsum("bi,io->bo", x, weight))
        return self.head(x)


def einsum_mlp_xavier_30() -> tuple[nn.Module, Tensor]:
    return EinsumMLP(30, WIDTH**-0.5), _features()


class MultiDot(nn.Module):
    """Three weights applied in one ``torch.linalg.multi_dot`` call: no per-weight op for a tracer to see."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = (nn.Parameter(torch.randn(WIDTH, WIDTH) * WIDTH**-0.5) for _ in range(3))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.linalg.multi_dot([x, self.w1, self.w2, self.w3]))


def multi_dot() -> tuple[nn.Module, Tensor]:
    return MultiDot(), _features()


def _reinit(model: nn.Module, report) -> nn.Module:
    return _reinitialize_flagged(model, report, "init.scale")


def _names(prefix: str, count: int, pattern: str = "{prefix}.{i}") -> tuple[str, ...]:
    return tuple(pattern.format(prefix=prefix, i=i) for i in range(count))


APPLIED: list[Control] = [
    Control("paramlist-linear-32", parameter_list_32,
            "32-layer ReLU net as F.linear over a ParameterList at Xavier's std (He et al. 2015)",
            {"init.scale": _names("w", 32), "signal.vanishing": ("w.0",)}, _reinit,
            ("init.scale", "signal.vanishing")),
    Control("reused-linear-24", reused_linear_24, "one nn.Linear applied 24 times at half He's std",
            {"init.scale": ("body",), "signal.vanishing": ("body",)}, _reinit, ("init.scale", "signal.vanishing")),
    Control("stacked-weight-20", stacked_weights_20, "a (20, 64, 64) weight indexed per layer, x @ W[i].T, half He",
            {"init.scale": _names("W", 20, "{prefix}[{i}]"), "signal.vanishing": ("W[0]",)}, _reinit,
            ("init.scale", "signal.vanishing")),
    Control("einsum-attention-std1", einsum_attention_std1, "einsum attention on raw (d, d) parameters at std 1",
            {"init.scale": _names("v", 4) + _names("o", 4), "signal.exploding": ()}, _reinit,
            ("init.scale", "signal.exploding")),
    Control("matmul-in-out-2x-he-12", matmul_double_he_12, "x @ W with W stored (in, out), twice He's std",
            {"init.scale": tuple(f"weights.{2 * i}" for i in range(6)),
             "signal.exploding": ("weights.0",)}, _reinit,
            ("init.scale", "signal.exploding")),
    Control("addmm-half-he-16", addmm_half_he_16, "torch.addmm(bias, x, W) per layer at half He's std",
            {"init.scale": _names("weights", 15), "signal.vanishing": ("weights.0",)}, _reinit,
            ("init.scale", "signal.vanishing")),
    Control("blocks-run-4-times", blocks_run_4_times, "6 Linear+ReLU layers run 4 times, torch's default init",
            {"init.scale": _names("layers", 6), "signal.vanishing": ("layers.0",)}, _reinit,
            ("init.scale", "signal.vanishing")),
    Control("bmm-experts-std1", bmm_experts_std1, "torch.bmm over stacked (E, in, out) expert weights at std 1",
            {"init.scale": _names("experts", 8), "signal.exploding": ("experts.0",)}, _reinit,
            ("init.scale", "signal.exploding")),
    Control("functional-conv-2x-he-12", functional_conv_double_he_12, "F.conv2d over a ParameterList, twice He",
            {"init.scale": _names("kernels", 12), "signal.exploding": ()}, _reinit,
            ("init.scale", "signal.exploding")),
    Control("einsum-mlp-xavier-30", einsum_mlp_xavier_30, "einsum('bi,io->bo') ReLU MLP at Xavier's std, 30 layers",
            {"init.scale": _names("weights", 30), "signal.vanishing": ("weights.0",)}, _reinit,
            ("init.scale", "signal.vanishing")),
    Control("multi-dot", multi_dot, "three weights applied inside one torch.linalg.multi_dot call",
            {"trace.incomplete": ("w1", "w2", "w3")}, lambda model, report: model, ()),
]
"""Bad controls of diagnosis v3: each must get its codes naming its weights, and its fix must clear them."""
