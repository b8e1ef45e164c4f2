"""The op vocabulary of the diagnosis: which modules and functional calls are layers, normalizations,
activations, joins, scalings and pass-throughs, and the behavioural tests that classify modules we do not know by
class (a normalization: output invariant to the input's scale; an elementwise activation: its shape on a grid; a
deliberate scaling: ``scale * x + bias``). Also the facts read off one op: the fan-in/fan-out of a weight as the op
applies it, whether it pools every position away, the constant factor it multiplies by.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
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


def leaf_modules(value: Any) -> list[Any]:
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


_IN_PLACE_DUNDERS = frozenset(
    {
        "__iadd__",
        "__isub__",
        "__imul__",
        "__itruediv__",
        "__ifloordiv__",
        "__imod__",
        "__ipow__",
        "__imatmul__",
        "__iand__",
        "__ior__",
        "__ixor__",
        "__ilshift__",
        "__irshift__",
        "__setitem__",
        "__set__",
    }
)
_WRITES_IN_PLACE: dict[Any, int] = {}  # function -> 1: by its name, 2: a torch.nn.functional op, 0: neither
# torch.nn.functional op -> the position of its `inplace` parameter (-1: none; None: unknown)
_INPLACE_POSITION: dict[Any, int | None] = {}


def _in_place_kind(func: Callable) -> int:
    kind = _WRITES_IN_PLACE.get(func)
    if kind is None:
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS:
            kind = 1
        else:
            kind = 2 if getattr(func, "__module__", None) == "torch.nn.functional" else 0
        with contextlib.suppress(TypeError):  # an unhashable callable: decided again next time
            _WRITES_IN_PLACE[func] = kind
    return kind


def writes_in_place(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether a call may overwrite one of its tensor arguments: a trailing-underscore op (``relu_``,
    ``copy_``, ``masked_fill_``), an augmented or item assignment (``x += y``, ``x[i] = v``), an ``out=`` or
    ``inplace=True`` argument, or a ``torch.nn.functional`` op given a positional ``True`` (its ``inplace``
    flag, ``F.relu(x, True)``; read conservatively: a spurious yes only costs an early read of the pending
    statistics). The name is looked at once per function."""
    kind = _in_place_kind(func)
    if kind == 1:
        return True
    if kwargs and (kwargs.get("inplace") is True or kwargs.get("out") is not None):
        return True
    return kind == 2 and any(a is True for a in args)


def written_tensors(func: Callable, args: tuple, kwargs: dict) -> list[Any] | None:
    """The tensors a call :func:`writes_in_place` may overwrite: ``[]`` when it writes none, None when they
    cannot be told apart (then any argument may be written).

    An in-place method or augmented/item assignment writes its first argument (``self``), ``out=`` its ``out``,
    ``inplace=True`` (by keyword, or a ``torch.nn.functional`` op's ``inplace`` parameter given a positional
    ``True``) its input; any other positional ``True`` of a ``torch.nn.functional`` op (``F.batch_norm``'s
    ``training``) may write the tensors after the input (running statistics), never the input itself.

    Example::

        written_tensors(torch.Tensor.add_, (x, y), {})            # [x]
        written_tensors(F.batch_norm, (x, mean, var, w, b, True), {})  # [mean, var, w, b]
    """
    kind = _in_place_kind(func)
    targets: list[Any] = []
    if kind == 1:
        if not args:
            return None
        targets += leaf_modules(args[0])
    if kwargs:
        if kwargs.get("inplace") is True:
            if not args and "input" not in kwargs:
                return None
            targets += leaf_modules(args[0] if args else kwargs["input"])
        if kwargs.get("out") is not None:
            targets += leaf_modules(kwargs["out"])
    if kind == 2 and any(a is True for a in args):
        position = _inplace_position(func)
        if position is None:
            return None
        if 0 <= position < len(args) and args[position] is True:
            targets += leaf_modules(args[0])
        targets += leaf_modules(args[1:])
    return [t for t in targets if isinstance(t, Tensor)]


def _inplace_position(func: Callable) -> int | None:
    """The position of a ``torch.nn.functional`` op's ``inplace`` parameter (-1 if it has none), None when its
    signature cannot be read or takes ``*args`` (once per function)."""
    try:
        return _INPLACE_POSITION[func]
    except (KeyError, TypeError):
        pass
    position: int | None = -1
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        position = None
    else:
        for index, parameter in enumerate(parameters):
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                position = None
                break
            if parameter.name == "inplace" and parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
                position = index
                break
    with contextlib.suppress(TypeError):
        _INPLACE_POSITION[func] = position
    return position


_GRID_HALF_WIDTH = 8.0
"""Elementwise modules are classified on the grid [-8, 8]: far enough into the tails that sigmoid/tanh-like
functions are within 1e-3 of their bounds and ReLU-like ones within 1e-3 of the identity or of zero."""


def classify_elementwise(module: nn.Module, like: Tensor) -> tuple[str, float] | None:
    """``(activation name, negative slope)`` of a parameter-free elementwise module, by what it computes.

    The module is evaluated on a grid over [-8, 8]: a bounded monotone map onto (0, 1) is sigmoid-like
    (``hardsigmoid`` if it reaches the bounds exactly), onto (-1, 1) tanh-like, one that is the identity for
    large inputs and ~0 (or a small slope) for negative ones ReLU-like (``relu`` if exactly zero there, else
    ``leaky_relu`` with its slope, ``elu`` if it tends to -1, ``gelu`` otherwise). None when the module is not
    elementwise or none of these (its internals are then traced as usual).

    Example::

        classify_elementwise(transformers.activations.NewGELUActivation(), x)  # ("gelu", 0.0)
    """
    grid = torch.linspace(-_GRID_HALF_WIDTH, _GRID_HALF_WIDTH, 1601, device=like.device)
    grid = grid.to(like.dtype) if like.is_floating_point() else grid
    try:
        with torch.no_grad():
            values = module(grid)
            flipped = module(grid.flip(0))
    except Exception:  # not callable on a 1-D tensor: not an elementwise activation
        return None
    if not isinstance(values, Tensor) or values.shape != grid.shape or not isinstance(flipped, Tensor):
        return None
    if flipped.shape != grid.shape:  # not elementwise
        return None
    # the tests below read the grid, the values and the flipped values as float64 on the host, in numpy: the
    # same IEEE float64 arithmetic and comparisons as torch's (``isclose`` written out as torch computes it), at
    # a fraction of the dispatch cost of some forty small torch calls
    x, y, f = torch.stack([grid.double(), values.double(), flipped.double()]).cpu().numpy()
    f = f[::-1]
    negative, positive = x < -4, x > 4
    tail, tail_x = y[negative], x[negative]
    with np.errstate(all="ignore"):  # inf - inf and NaN comparisons read as torch reads them, silently
        finite = bool(np.isfinite(y).all())
        symmetric_ok = bool(_isclose(f, y, 1e-5, 1e-4).all())
        identity = bool(_isclose(y, x, 1e-5, 1e-4).all())
        low, high = float(y[0]), float(y[-1])
        increasing = bool((y[1:] - y[:-1] >= -1e-6).all())
        lowest, highest = float(y.min()), float(y.max())
        positive_identity = bool(_isclose(y[positive], x[positive], 1e-3, 1e-3).all())
        tail_zero = bool((tail == 0).all())
        rise, run = float(tail[-1] - tail[0]), float(tail_x[-1] - tail_x[0])
    if not finite or not symmetric_ok or identity:
        return None
    if increasing and lowest >= -1e-6 and highest <= 1 + 1e-6 and low < 1e-3 and high > 1 - 1e-3:
        return ("hardsigmoid" if low == 0.0 and high == 1.0 else "sigmoid"), 0.0
    if increasing and lowest >= -1 - 1e-6 and highest <= 1 + 1e-6 and low < -1 + 1e-3 and high > 1 - 1e-3:
        return ("hardtanh" if low == -1.0 and high == 1.0 else "tanh"), 0.0
    if not positive_identity:
        return None
    if tail_zero:
        return "relu", 0.0
    slope = rise / run
    with np.errstate(all="ignore"):
        leaky = 0.0 < slope < 1.0 and bool(_isclose(tail, slope * tail_x, 1e-3, 1e-4).all())
    if leaky:
        return "leaky_relu", slope
    if abs(low + 1.0) < 1e-2:
        return "elu", 0.0
    if abs(low) < 1e-2:
        return "gelu", 0.0
    return None


def _isclose(values: np.ndarray, other: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """``torch.isclose(values, other, rtol, atol)`` on float64 arrays, computed the way torch computes it: equal,
    or a finite ``|values - other|`` within ``atol + |rtol * other|``."""
    error = np.abs(values - other)
    return (values == other) | (np.isfinite(error) & (error <= atol + np.abs(rtol * other)))


def normalizes(module: nn.Module, args: tuple) -> bool:
    """Whether ``module`` normalises its input (see :func:`norm_gain`).

    Example::

        normalizes(transformers.models.t5.modeling_t5.T5LayerNorm(64), (x,))  # True
    """
    return norm_gain(module, args) is not None


def norm_gain(module: nn.Module, args: tuple) -> float | None:
    """Whether ``module`` normalises its input: its output does not change when the input is scaled.

    Tested on the real input scaled by 4 and by 16 (large enough that a typical epsilon no longer matters), so
    any normalisation class is recognised by what it computes (RMSNorm variants, T5's layer norm, channels-first
    layer norms), not by its name. Returns the module's gain, the RMS of its output (a normalised input has RMS
    1), or None if it does not normalise.

    Example::

        norm_gain(transformers.models.gemma.modeling_gemma.GemmaRMSNorm(64), (x,))  # 1.0: (1 + weight), weight 0
    """
    behaviour = _scaled_outputs(module, args, (4.0, 16.0))
    return _normalized_gain(*behaviour) if behaviour is not None else None


def affine_gain(module: nn.Module, args: tuple) -> float | None:
    """The gain of a module that computes ``scale * x + bias`` on its input, None if it computes anything else.

    Such modules (LayerScale, ReZero/SkipInit gates, the per-channel affine blocks of ResMLP or of a frozen
    BatchNorm) are deliberate scalings, not layers: they mix no features, so they add no depth, and their factor
    is measured through. Recognised by behaviour on the real input scaled by 4 and by 16 (the inputs
    :func:`norm_gain` tests) and by 0: the output minus the output at zero is linear in the input (four times the
    input gives four times it) and keeps its shape. The gain is the RMS of that linear part over the RMS of the
    input (``gamma``'s RMS for LayerScale).

    Example::

        affine_gain(LayerScale(64, init_values=1e-5), (x,))  # 1e-5
    """
    behaviour = _scaled_outputs(module, args, (4.0, 16.0, 0.0))
    return _linear_gain(*behaviour) if behaviour is not None else None


def scaling_behaviour(module: nn.Module, args: tuple) -> tuple[str, float] | None:
    """``("norm", gain)`` when ``module`` normalises its input (:func:`norm_gain`), ``("scale", gain)`` when it
    computes ``scale * x + bias`` (:func:`affine_gain`), None otherwise.

    Both tests read the same outputs at 4x and 16x the input, so a module is called three times at most (twice
    when it normalises), not once per test per scale: these calls are most of what classifying an unfamiliar
    parameterised leaf costs.

    Example::

        scaling_behaviour(LayerScale(64, init_values=1e-5), (x,))  # ("scale", 1e-5)
    """
    scaled = _scaled_outputs(module, args, (4.0, 16.0))
    if scaled is None:
        return None
    gain = _normalized_gain(*scaled)
    if gain is not None:
        return ("norm", gain)
    at_zero = _scaled_outputs(module, args, (0.0,))
    first, small, large = scaled  # the input and its outputs at the two factors above
    gain = _linear_gain(first, small, large, at_zero[1]) if at_zero is not None else None
    return ("scale", gain) if gain is not None else None


def _scaled_outputs(module: nn.Module, args: tuple, factors: tuple[float, ...]) -> tuple[Tensor, ...] | None:
    """``(input, module(factor * input, *rest) for each factor)`` on the first tensor argument, without grad;
    None when there is no floating-point input, the module raises, or an output is not a tensor of its shape."""
    first = next((a for a in args if isinstance(a, Tensor)), None)
    if first is None or not first.is_floating_point() or first.numel() < 2:
        return None
    rest = args[1:]
    try:
        with torch.no_grad():
            outputs = tuple(module(first * factor, *rest) for factor in factors)
    except Exception:
        return None
    if not all(isinstance(t, Tensor) and t.shape == first.shape for t in outputs):
        return None
    return (first, *outputs)


def _normalized_gain(first: Tensor, small: Tensor, large: Tensor) -> float | None:
    """The output RMS when the outputs at 4x and 16x the input agree (a normalization), else None. The float32
    norms and their threshold are read back at once (the same comparisons as on the tensors)."""
    with torch.no_grad():
        scale = small.float().norm()
        scale, difference, threshold, gain = torch.stack(
            [scale, (large.float() - small.float()).norm(), 1e-3 * scale, large.float().square().mean().sqrt()]
        ).tolist()
    return gain if scale > 0 and difference <= threshold else None


def _linear_gain(first: Tensor, small: Tensor, large: Tensor, zero: Tensor) -> float | None:
    """RMS of ``f(4x) - f(0)`` over RMS of ``4x`` when ``f(16x) - f(0)`` is four times it (affine), else None.
    The float64 norms are read back at once (a Python float is a float64: the same arithmetic)."""
    with torch.no_grad():
        linear, quadrupled = (small - zero).double(), (large - zero).double()
        size, residual, first_rms, linear_rms = torch.stack(
            [
                quadrupled.norm(),
                (quadrupled - 4.0 * linear).norm(),
                first.double().square().mean().sqrt(),
                linear.square().mean().sqrt(),
            ]
        ).tolist()
    if not math.isfinite(size) or residual > 1e-4 * size + 1e-30:
        return None
    reference = 4.0 * first_rms
    return linear_rms / reference if reference > 0 else None


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
