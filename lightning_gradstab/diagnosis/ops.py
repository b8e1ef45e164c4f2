"""The op vocabulary of the diagnosis: which modules and functional calls are layers, normalizations,
activations, joins, scalings and pass-throughs, and the name of an op. Also the facts read off one op: the
fan-in/fan-out of a weight as the op applies it, whether it pools every position away, the constant factor it
multiplies by. (Modules not known by class are classified by what they compute, in :mod:`.behaviour`; which
calls write a tensor in place is :mod:`.in_place`.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import SUPPORTED_NODES, tree_leaves

LAYER_TYPES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Linear, "linear"),
    (nn.Bilinear, "linear"),
    (nn.modules.conv._ConvNd, "conv"),
    (nn.Embedding, "embedding"),
    (nn.EmbeddingBag, "embedding"),
    (nn.RNNBase, "recurrent"),
    (nn.RNNCellBase, "recurrent"),
    (nn.MultiheadAttention, "attention"),
)
"""Module types recorded as one parameterised layer, with their kind."""

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)
NORM_FUNCTIONS = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "normalize"})

ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.RReLU: "rrelu",
    nn.ELU: "elu",
    nn.CELU: "celu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.Softplus: "softplus",
    nn.Hardswish: "hardswish",
    nn.Tanh: "tanh",
    nn.Hardtanh: "hardtanh",
    nn.Softsign: "softsign",
    nn.Sigmoid: "sigmoid",
    nn.Hardsigmoid: "hardsigmoid",
    nn.LogSigmoid: "logsigmoid",
    nn.SELU: "selu",
    nn.Softmax: "softmax",
    nn.LogSoftmax: "log_softmax",
    nn.Softmin: "softmin",
}

ACTIVATION_FAMILY: dict[str, str] = {
    **dict.fromkeys(
        (
            "relu",
            "relu6",
            "leaky_relu",
            "prelu",
            "rrelu",
            "elu",
            "celu",
            "gelu",
            "silu",
            "mish",
            "softplus",
            "hardswish",
        ),
        "relu",
    ),
    **dict.fromkeys(("tanh", "hardtanh", "softsign"), "tanh"),
    **dict.fromkeys(("sigmoid", "hardsigmoid", "logsigmoid"), "sigmoid"),
    "selu": "selu",
    **dict.fromkeys(("softmax", "log_softmax", "softmin"), "softmax"),
}
"""Activation name -> family whose init rule applies (He for ``relu``, Xavier for ``tanh``/``sigmoid``...)."""

FUNCTIONAL_LAYERS = {
    "linear": "linear",
    "bilinear": "linear",
    "matmul": "linear",
    "mm": "linear",
    "addmm": "linear",
    "conv1d": "conv",
    "conv2d": "conv",
    "conv3d": "conv",
    "conv_transpose1d": "conv",
    "conv_transpose2d": "conv",
    "conv_transpose3d": "conv",
    "embedding": "embedding",
    "einsum": "linear",
    "bmm": "linear",
    "baddbmm": "linear",
    "addbmm": "linear",
    "tensordot": "linear",
    "mv": "linear",
    "addmv": "linear",
    "grouped_mm": "linear",  # mixture-of-experts: every expert's weight applied to its tokens in one call
    "multi_head_attention_forward": "attention",  # attention over q/k/v/out weights passed in (WavLM)
}
"""Ops that apply a weight: with a parameter (or a slice of one) as an operand, each call is one layer."""
JOINS = frozenset({"add", "cat", "concat", "concatenate"})
# a difference of two traced paths (``pred - target``, ``x - mean``) is arithmetic, never a skip connection
DIFFERENCES = frozenset({"sub"})
SCALINGS = frozenset({"mul", "div", "truediv"})
# ops that move, select or rescale values without changing which layer they come from
PASS_THROUGH = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "flatten",
        "unflatten",
        "permute",
        "transpose",
        "t",
        "contiguous",
        "getitem",
        "squeeze",
        "unsqueeze",
        "expand",
        "expand_as",
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "max_pool1d_with_indices",
        "max_pool2d_with_indices",
        "pad",
        "chunk",
        "split",
        "unbind",
        "narrow",
        "select",
        "clone",
        "to",
        "float",
        "type_as",
        "repeat",
        "mean",
        "get",
        "detach",
        "flip",
        "roll",
        "pixel_shuffle",
    }
)
_RENAMES = {
    "radd": "add",
    "iadd": "add",
    "rsub": "sub",
    "isub": "sub",
    "rmul": "mul",
    "imul": "mul",
    "itruediv": "truediv",
    "rtruediv": "truediv",
    "rmatmul": "matmul",
    "concat": "cat",
}


class _NotPlain(Exception):
    """A container ``tree_leaves`` flattens its own way (a namedtuple, an OrderedDict, a registered class)."""


def _plain_leaves(items: Any, out: list[Any]) -> None:
    for item in items:
        kind = type(item)
        if kind is tuple or kind is list:
            _plain_leaves(item, out)
        elif kind is dict:
            _plain_leaves(item.values(), out)
        elif kind in SUPPORTED_NODES or isinstance(item, (tuple, list, dict)):
            raise _NotPlain
        else:
            out.append(item)


def pytree_leaves(value: Any) -> list[Any]:
    """``tree_leaves`` with fast paths for a tensor and nested plain tuples, lists and dicts (most calls: the
    tracer's hot path; ``x.view((b, t, h, d))``, ``torch.cat([a, b])``); anything ``tree_leaves`` flattens its own
    way (a namedtuple, a registered container) is left to it, so the leaves are always the same."""
    if isinstance(value, Tensor):
        return [value]
    kind = type(value)
    if kind is tuple or kind is list or kind is dict or kind is torch.Size:
        out: list[Any] = []
        try:
            _plain_leaves(value.values() if kind is dict else value, out)
        except _NotPlain:
            return tree_leaves(value)
        return out
    return tree_leaves(value)


def activation_family(name: str | None) -> str | None:
    """The init family of an activation name (``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"selu"``, ``"softmax"``)."""
    return ACTIVATION_FAMILY.get(name) if name else None


_LAYER_KINDS: dict[type, str | None] = {}
_ACTIVATION_NAMES: dict[type, str | None] = {}


def layer_kind(module: nn.Module) -> str | None:
    """The kind of parameterised layer ``module`` is (``"linear"``, ``"conv"``...), None if not a known layer
    (decided once per class)."""
    cls = type(module)
    if cls not in _LAYER_KINDS:
        _LAYER_KINDS[cls] = next((kind for layer_type, kind in LAYER_TYPES if issubclass(cls, layer_type)), None)
    return _LAYER_KINDS[cls]


def activation_module_name(module: nn.Module) -> str | None:
    """The activation a module class computes (``nn.GELU`` -> ``"gelu"``), None if not one (once per class)."""
    cls = type(module)
    if cls not in _ACTIVATION_NAMES:
        _ACTIVATION_NAMES[cls] = next((ACTIVATION_MODULES[c] for c in cls.__mro__ if c in ACTIVATION_MODULES), None)
    return _ACTIVATION_NAMES[cls]


_OP_NAMES: dict[Any, str] = {}


def op_name(func: Callable) -> str:
    """The op's name without underscores, in-place and reflected variants renamed (``__radd__`` -> ``add``),
    remembered per function: the tracer asks for every call the model makes."""
    try:
        return _OP_NAMES[func]
    except (KeyError, TypeError):
        pass
    name = getattr(func, "__name__", type(func).__name__).strip("_")
    name = _RENAMES.get(name, name)
    with contextlib.suppress(TypeError):  # an unhashable callable: named again next time
        _OP_NAMES[func] = name
    return name


def op_fans(op: str, args: tuple, weight: Tensor) -> tuple[int, int] | None:
    """``(fan_in, fan_out)`` of ``weight`` as ``op`` applies it; None where ``torch.nn.init``'s convention holds
    (``F.linear``'s ``(out, in)``, convolutions).

    ``x @ W`` contracts W's second-to-last axis (fan-in) into its last (fan-out), ``W @ x`` the reverse; in an
    einsum the weight's axes missing from the output are contracted (fan-in) and those only it carries into the
    output are its fan-out (axes shared with the other operand, such as heads, are batch axes).
    """
    if op == "einsum" and args and isinstance(args[0], str):
        equation = args[0].replace(" ", "")
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        if "->" not in equation or "." in equation:
            return None
        inputs, result = equation.split("->")
        terms = inputs.split(",")
        position = next((i for i, t in enumerate(operands) if t is weight), None)
        if position is None or len(terms) != len(operands):
            return None
        own = terms[position]
        others = "".join(t for i, t in enumerate(terms) if i != position)
        size = dict(zip(own, weight.shape, strict=False))
        fan_in = math.prod(size[c] for c in own if c not in result)
        fan_out = math.prod(size[c] for c in own if c in result and c not in others)
        return (fan_in, fan_out) if fan_in and fan_out else None
    if op in ("matmul", "mm", "bmm", "baddbmm", "addbmm", "addmm", "grouped_mm") and weight.dim() >= 2:
        operands = [a for a in args if isinstance(a, Tensor)][-2:]
        if len(operands) == 2 and operands[1] is weight:
            return int(weight.shape[-2]), int(weight.shape[-1])
        if len(operands) == 2 and operands[0] is weight:
            return int(weight.shape[-1]), int(weight.shape[-2])
    if weight.dim() > 2 and op in ("linear",):
        return int(weight.shape[-1]), int(weight.shape[-2])
    return None


def pools_positions(source: Tensor, output: Tensor) -> bool:
    """Whether an op pools or selects away every position of a (B, C, ...) or (B, T, D) signal, leaving one
    vector of features per sample: a global pool, ``x.mean(1)``, the class token ``x[:, 0]``. Deltas on the two
    sides of it are not comparable (the pool divides the per-position gradient by the number of positions)."""
    if source.dim() < 3 or output.numel() >= source.numel() or output.dim() < 1:
        return False
    per_sample = output.numel() // max(int(source.shape[0]), 1)
    return output.numel() % max(int(source.shape[0]), 1) == 0 and per_sample in (source.shape[1], source.shape[-1])


def constant_factor(op: str, args: tuple, traced: dict[int, int], is_weight: Callable[[Tensor], bool]) -> float:
    numbers = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    # an untraced tensor factor is a constant at init: a 0-d normalizer (Gemma's sqrt(d)) or a parameter vector
    # (LayerScale's gamma, 1e-6 in ConvNeXt), counted by its root-mean-square
    numbers += [
        float(a.detach().float().square().mean().sqrt())
        for a in args
        if isinstance(a, Tensor) and id(a) not in traced and a.is_floating_point() and (a.numel() == 1 or is_weight(a))
    ]
    if not numbers:
        return 1.0
    value = float(numbers[0])
    if op == "mul":
        return abs(value)
    divides_tensor = args and isinstance(args[0], Tensor) and id(args[0]) in traced
    return abs(1.0 / value) if value != 0 and divides_tensor else 1.0
