"""Network builders for the example tasks: deep MLP/CNN stacks, recurrent sequence models, a char GPT.

Each builder takes the architecture knobs the classic papers vary (depth, init, activation, normalization,
residual connections, pre-/post-LN) so one config switch reproduces one published failure. The task supplies
the input and output sizes; ``conf/model/*.yaml`` supplies the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from examples.schema import CELLS, INITS, NORMS  # the names a config may choose (no torch there)

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def _choice(value: str, accepted: tuple[str, ...] | list[str], argument: str) -> str:
    if value not in accepted:
        raise ValueError(f"`{argument}` must be one of {list(accepted)}, got {value!r}")
    return value


def _positive(value: int, argument: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{argument}` must be an int >= {minimum}, got {value!r}")
    return value


def init_weights(layer: nn.Module, init: str) -> None:
    """Initialise a Linear/Conv layer's weight by a named rule and zero its bias.

    ``xavier``: Glorot & Bengio's normalized init, Var = 2 / (fan_in + fan_out); ``he``: Var = 2 / fan_in
    (He et al. 2015, keeps ReLU activations at constant scale); ``standard``: U[-1/sqrt(fan_in), +] (the
    "standard" init Glorot & Bengio compare against); ``pytorch``: leave PyTorch's default untouched.

    Example::

        init_weights(nn.Linear(64, 64), "he")
    """
    _choice(init, INITS, "init")
    if init == "pytorch":
        return
    weight = layer.weight
    if init == "xavier":
        nn.init.xavier_normal_(weight)
    elif init == "he":
        nn.init.kaiming_normal_(weight, nonlinearity="relu")
    else:
        fan_in = weight[0].numel()
        nn.init.uniform_(weight, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class Block(nn.Module):
    """One weight layer, optional normalization and the activation, with an optional identity shortcut.

    Residual blocks compute ``act(x + norm(W x))`` with the branch's norm scale started at
    ``residual_branch_gain`` (He et al. 2016 train deep nets because the block starts near identity).

    Example::

        block = Block(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), residual=True, residual_branch_gain=0.1)
    """

    def __init__(
        self, layer: nn.Module, norm: nn.Module, activation: nn.Module, residual: bool, residual_branch_gain: float
    ) -> None:
        super().__init__()
        self.layer, self.norm, self.activation, self.residual = layer, norm, activation, residual
        if residual and getattr(norm, "weight", None) is not None:
            nn.init.constant_(norm.weight, residual_branch_gain)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.norm(self.layer(x))
        return self.activation(x + branch if self.residual else branch)


def _norm(kind: str, width: int, spatial: bool) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(width) if spatial else nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.GroupNorm(1, width) if spatial else nn.LayerNorm(width)
    return nn.Identity()


def _stack(
    make_layer: Callable[[int, int], nn.Module],
    in_width: int,
    hidden_layers: int,
    width: int,
    activation: str,
    init: str,
    norm: str,
    residual: bool,
    residual_branch_gain: float,
    *,
    spatial: bool,
) -> list[nn.Module]:
    """The input layer plus ``hidden_layers`` width->width blocks (residual ones where widths match)."""
    blocks: list[nn.Module] = []
    for index in range(hidden_layers + 1):
        layer = make_layer(in_width if index == 0 else width, width)
        init_weights(layer, init)
        shortcut = residual and index > 0
        blocks.append(
            Block(layer, _norm(norm, width, spatial), ACTIVATIONS[activation](), shortcut, residual_branch_gain)
        )
    return blocks


def build_mlp(
    input_shape: Sequence[int],
    num_classes: int,
    depth: int = 30,
    width: int = 64,
    activation: str = "relu",
    init: str = "he",
    norm: str = "none",
    residual: bool = False,
    residual_branch_gain: float = 0.1,
) -> nn.Sequential:
    """A ``depth``-layer perceptron (``depth`` counts weight layers, as in "30-layer" of He et al. 2015).

    Example::

        net = build_mlp((1, 8, 8), 10, depth=30, width=64, activation="relu", init="xavier")
    """
    _positive(depth, "depth", minimum=2)
    _positive(width, "width")
    _choice(activation, list(ACTIVATIONS), "activation")
    _choice(norm, NORMS, "norm")
    architecture = (width, activation, init, norm, residual, residual_branch_gain)
    blocks = _stack(nn.Linear, math.prod(input_shape), depth - 2, *architecture, spatial=False)
    head = nn.Linear(width, num_classes)
    init_weights(head, init)
    return nn.Sequential(nn.Flatten(), *blocks, head)


def build_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    depth: int = 8,
    width: int = 16,
    activation: str = "relu",
    init: str = "he",
    norm: str = "batch",
    residual: bool = False,
    residual_branch_gain: float = 0.1,
) -> nn.Sequential:
    """A ``depth``-layer 3x3 convolutional net with global average pooling (small images, e.g. 8x8 digits).

    Example::

        net = build_cnn((1, 8, 8), 10, depth=8, width=16, norm="batch", residual=True)
    """
    _positive(depth, "depth", minimum=2)
    _positive(width, "width")
    _choice(activation, list(ACTIVATIONS), "activation")
    _choice(norm, NORMS, "norm")

    def conv(channels_in: int, channels_out: int) -> nn.Conv2d:
        return nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1)

    architecture = (width, activation, init, norm, residual, residual_branch_gain)
    blocks = _stack(conv, input_shape[0], depth - 2, *architecture, spatial=True)
    head = nn.Linear(width, num_classes)
    init_weights(head, init)
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


class RecurrentNet(nn.Module):
    """A one-layer RNN/LSTM/GRU read out from its last hidden state (Pascanu et al. 2013's setting).

    ``recurrent_init_std`` draws every weight from N(0, std) ("basic tanh" init: 0.1);
    ``recurrent_spectral_radius`` then rescales each hidden-to-hidden matrix to that spectral radius (> 1
    makes exploding gradients possible, < 1 makes them vanish for a linear net).

    Example::

        net = RecurrentNet(6, 4, cell="rnn", hidden_size=50, recurrent_spectral_radius=1.2)
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        cell: str = "rnn",
        hidden_size: int = 50,
        recurrent_init_std: float = 0.1,
        recurrent_spectral_radius: float | None = None,
    ) -> None:
        super().__init__()
        _choice(cell, CELLS, "cell")
        _positive(hidden_size, "hidden_size")
        if recurrent_init_std <= 0:
            raise ValueError(f"`recurrent_init_std` must be > 0, got {recurrent_init_std!r}")
        if recurrent_spectral_radius is not None and recurrent_spectral_radius <= 0:
            raise ValueError(f"`recurrent_spectral_radius` must be > 0 or None, got {recurrent_spectral_radius!r}")
        recurrent = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        kwargs = {"nonlinearity": "tanh"} if cell == "rnn" else {}
        self.recurrent = recurrent(input_size, hidden_size, batch_first=True, **kwargs)
        self.readout = nn.Linear(hidden_size, output_size)
        with torch.no_grad():
            for name, parameter in self.recurrent.named_parameters():
                if name.startswith("bias"):
                    parameter.zero_()
                    continue
                parameter.normal_(0.0, recurrent_init_std)
                if name.startswith("weight_hh") and recurrent_spectral_radius is not None:
                    for gate in parameter.split(hidden_size):
                        radius = torch.linalg.eigvals(gate).abs().max()
                        gate.mul_(recurrent_spectral_radius / radius)

    def forward(self, sequences: Tensor) -> Tensor:
        hidden_states, _ = self.recurrent(sequences)
        return self.readout(hidden_states[:, -1])


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (PyTorch's fused scaled-dot-product kernel).

    ``qk_layernorm=True`` normalizes each head's queries and keys with a LayerNorm before the dot product
    (Dehghani et al. 2023, "Scaling Vision Transformers to 22B parameters"; Wortsman et al. 2023 show it removes
    attention-logit growth at high learning rates): the logits are then bounded by the LayerNorm gains.

    Example::

        attention = CausalSelfAttention(embed_dim=64, num_heads=4)
        out = attention(torch.randn(2, 16, 64))  # (2, 16, 64), position t sees positions <= t only
    """

    def __init__(self, embed_dim: int, num_heads: int, qk_layernorm: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"`embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        head_dim = embed_dim // num_heads
        self.q_norm = nn.LayerNorm(head_dim) if qk_layernorm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_layernorm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        batch, length, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        q, k, v = (t.view(batch, length, self.num_heads, -1) for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (self.q_norm(q), self.k_norm(k), v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, channels))


class TransformerBlock(nn.Module):
    """Attention + MLP sublayers, LayerNorm before (pre-LN) or after (post-LN, Vaswani et al.) each residual add.

    Post-LN puts a LayerNorm on the residual path, which is why it needs learning-rate warm-up at high
    learning rates (Xiong et al. 2020); pre-LN leaves the residual stream untouched.

    Example::

        block = TransformerBlock(embed_dim=64, num_heads=4, pre_ln=False)  # the original post-LN block
    """

    def __init__(self, embed_dim: int, num_heads: int, pre_ln: bool, qk_layernorm: bool = False) -> None:
        super().__init__()
        self.pre_ln = pre_ln
        self.ln_attention, self.ln_mlp = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.attention = CausalSelfAttention(embed_dim, num_heads, qk_layernorm)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim), nn.GELU(), nn.Linear(4 * embed_dim, embed_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_ln:
            x = x + self.attention(self.ln_attention(x))
            return x + self.mlp(self.ln_mlp(x))
        x = self.ln_attention(x + self.attention(x))
        return self.ln_mlp(x + self.mlp(x))


class CharGPT(nn.Module):
    """A small GPT-style character model (nanoGPT's shape: learned positions, tied input/output embedding).

    Example::

        net = CharGPT(vocab_size=96, block_size=64, num_layers=2, num_heads=2, embed_dim=64, pre_ln=True)
        stable = CharGPT(vocab_size=96, block_size=64, qk_layernorm=True)  # Wortsman et al. 2023's first fix
        logits = net(torch.zeros(1, 64, dtype=torch.long))  # (1, 64, 96)
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        num_layers: int = 4,
        num_heads: int = 4,
        embed_dim: int = 128,
        pre_ln: bool = True,
        qk_layernorm: bool = False,
    ) -> None:
        super().__init__()
        _positive(num_layers, "num_layers")
        _positive(num_heads, "num_heads")
        _positive(embed_dim, "embed_dim")
        self.token_embedding = nn.Embedding(vocab_size, embed_dim)
        self.position_embedding = nn.Embedding(block_size, embed_dim)
        self.blocks = nn.Sequential(
            *(TransformerBlock(embed_dim, num_heads, pre_ln, qk_layernorm) for _ in range(num_layers))
        )
        # pre-LN stacks end un-normalized; post-LN blocks already end in a LayerNorm
        self.final_norm = nn.LayerNorm(embed_dim) if pre_ln else nn.Identity()
        self.head = nn.Linear(embed_dim, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.head(self.final_norm(self.blocks(x)))
