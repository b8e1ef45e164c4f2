"""The model's dataflow graph, recovered from one real forward pass.

The module tree alone misses what ``forward`` does with functional calls (``F.relu``, ``x.sigmoid()``,
``x + block(x)``), and ``torch.fx`` fails on data-dependent code. So we run the real forward once with
forward hooks on the modules we understand (layers, normalizations, activation modules), which are recorded
as single nodes, and a ``TorchFunctionMode`` that records every functional call between them. Tensors are
matched to the node that produced them by identity. From the nodes we derive, for each parameterised layer,
the activation that consumes its output, whether a normalization follows, whether it ends a residual branch,
and the longest *plain* chain: the most distinct parameterised layers a signal must cross with no skip
connection offering a shorter path.

Modules we do not know by class are recognised by what they compute, at their first call: a leaf whose output
does not change when its input is scaled is a normalization (RMSNorm classes, T5's layer norm), a
parameter-free elementwise leaf is classified as a sigmoid-, tanh- or ReLU-like activation on a grid (so
GELU-tanh's internal add and tanh are not read as structure). A product whose factor is broadcast or comes from
a sigmoid-family activation is a gate (Squeeze-Excitation), off the main path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

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
        ("relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "celu", "gelu", "silu", "mish", "softplus",
         "hardswish"),
        "relu",
    ),
    **dict.fromkeys(("tanh", "hardtanh", "softsign"), "tanh"),
    **dict.fromkeys(("sigmoid", "hardsigmoid", "logsigmoid"), "sigmoid"),
    "selu": "selu",
    **dict.fromkeys(("softmax", "log_softmax", "softmin"), "softmax"),
}
"""Activation name -> family whose init rule applies (He for ``relu``, Xavier for ``tanh``/``sigmoid``...)."""

_FUNCTIONAL_LAYERS = {
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
_JOINS = frozenset({"add", "cat", "concat", "concatenate"})
# a difference of two traced paths (``pred - target``, ``x - mean``) is arithmetic, never a skip connection
_DIFFERENCES = frozenset({"sub"})
# ops that take a parameter apart or re-lay it out without applying it: the result is still "that weight"
_WEIGHT_VIEWS = frozenset({
    "getitem", "select", "unbind", "t", "get", "transpose", "permute", "view", "reshape", "contiguous", "to",
    "float", "half", "bfloat16", "type_as", "squeeze", "unsqueeze", "flatten", "unflatten", "narrow", "clone",
    "chunk", "split", "mT", "T",
})
_SCALINGS = frozenset({"mul", "div", "truediv"})
# ops that move, select or rescale values without changing which layer they come from
_PASS_THROUGH = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t", "contiguous",
    "getitem", "squeeze", "unsqueeze", "expand", "expand_as", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "pad", "chunk", "split", "unbind", "narrow", "select", "clone", "to", "float", "type_as", "repeat", "mean",
    "get", "detach", "flip", "roll", "pixel_shuffle",
})
_RENAMES = {"radd": "add", "iadd": "add", "rsub": "sub", "isub": "sub", "rmul": "mul", "imul": "mul",
            "itruediv": "truediv", "rtruediv": "truediv", "rmatmul": "matmul", "concat": "cat"}


def _leaves(value: Any) -> list[Any]:
    """``tree_leaves`` with fast paths for a tensor and a flat tuple/list (most calls: the tracer's hot path)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and all(not isinstance(v, (tuple, list, dict)) for v in value):
        return list(value)
    return tree_leaves(value)


def activation_family(name: str | None) -> str | None:
    """The init family of an activation name (``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"selu"``, ``"softmax"``)."""
    return ACTIVATION_FAMILY.get(name) if name else None


def layer_kind(module: nn.Module) -> str | None:
    """The kind of parameterised layer ``module`` is (``"linear"``, ``"conv"``...), None if not a known layer."""
    for layer_type, kind in LAYER_TYPES:
        if isinstance(module, layer_type):
            return kind
    return None


def _activation_module_name(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        if cls in ACTIVATION_MODULES:
            return ACTIVATION_MODULES[cls]
    return None


def _op_name(func: Callable) -> str:
    name = getattr(func, "__name__", type(func).__name__).strip("_")
    return _RENAMES.get(name, name)
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
    if not isinstance(values, Tensor) or values.shape != grid.shape or not torch.isfinite(values).all():
        return None
    x, y = grid.double().cpu(), values.double().cpu()
    if not torch.allclose(flipped.double().cpu().flip(0), y, atol=1e-4) or torch.allclose(y, x, atol=1e-4):
        return None
    negative, positive = x < -4, x > 4
    low, high = float(y[0]), float(y[-1])
    increasing = bool((y[1:] - y[:-1] >= -1e-6).all())
    if increasing and y.min() >= -1e-6 and y.max() <= 1 + 1e-6 and low < 1e-3 and high > 1 - 1e-3:
        return ("hardsigmoid" if low == 0.0 and high == 1.0 else "sigmoid"), 0.0
    if increasing and y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6 and low < -1 + 1e-3 and high > 1 - 1e-3:
        return ("hardtanh" if low == -1.0 and high == 1.0 else "tanh"), 0.0
    if not torch.allclose(y[positive], x[positive], rtol=1e-3, atol=1e-3):
        return None
    tail = y[negative]
    if bool((tail == 0).all()):
        return "relu", 0.0
    slope = float((tail[-1] - tail[0]) / (x[negative][-1] - x[negative][0]))
    if 0.0 < slope < 1.0 and torch.allclose(tail, slope * x[negative], rtol=1e-3, atol=1e-4):
        return "leaky_relu", slope
    if abs(low + 1.0) < 1e-2:
        return "elu", 0.0
    if abs(low) < 1e-2:
        return "gelu", 0.0
    return None


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
    first = next((a for a in args if isinstance(a, Tensor)), None)
    if first is None or not first.is_floating_point() or first.numel() < 2:
        return None
    rest = args[1:]
    try:
        with torch.no_grad():
            small, large = module(first * 4.0, *rest), module(first * 16.0, *rest)
    except Exception:
        return None
    if not isinstance(small, Tensor) or not isinstance(large, Tensor) or small.shape != first.shape:
        return None
    scale = small.float().norm()
    if not (bool(scale > 0) and bool((large.float() - small.float()).norm() <= 1e-3 * scale)):
        return None
    return float(large.float().square().mean().sqrt())


def affine_gain(module: nn.Module, args: tuple) -> float | None:
    """The gain of a module that computes ``scale * x + bias`` on its input, None if it computes anything else.

    Such modules (LayerScale, ReZero/SkipInit gates, the per-channel affine blocks of ResMLP or of a frozen
    BatchNorm) are deliberate scalings, not layers: they mix no features, so they add no depth, and their factor
    is measured through. Recognised by behaviour on the real input: the output minus the output at zero is
    linear in the input (doubling the input doubles it) and keeps its shape. The gain is the RMS of that linear
    part over the RMS of the input (``gamma``'s RMS for LayerScale).

    Example::

        affine_gain(LayerScale(64, init_values=1e-5), (x,))  # 1e-5
    """
    first = next((a for a in args if isinstance(a, Tensor)), None)
    if first is None or not first.is_floating_point() or first.numel() < 2:
        return None
    rest = args[1:]
    try:
        with torch.no_grad():
            once, twice, zero = module(first, *rest), module(first * 2.0, *rest), module(first * 0.0, *rest)
    except Exception:
        return None
    if not all(isinstance(t, Tensor) and t.shape == first.shape for t in (once, twice, zero)):
        return None
    linear, doubled = (once - zero).double(), (twice - zero).double()
    size = doubled.norm()
    if not bool(torch.isfinite(size)) or bool((doubled - 2.0 * linear).norm() > 1e-4 * size + 1e-30):
        return None
    reference = first.double().square().mean().sqrt()
    return float(linear.square().mean().sqrt() / reference) if bool(reference > 0) else None


@dataclass
class Node:
    """One recorded step of the forward pass.

    ``kind`` is ``input``, ``layer``, ``norm``, ``activation``, ``join`` (an add/cat of two traced paths),
    ``pass`` (reshapes, dropout, pooling, scaling by a constant, a gate multiplying the main path) or ``op``
    (anything else). ``side_inputs`` are inputs off the main path (the gate of a Squeeze-Excitation product),
    ``value_inputs`` the value argument of a fused attention call.
    """

    index: int
    kind: str
    name: str
    op: str
    inputs: list[int]
    layer_kind: str | None = None
    scale: float = 1.0  # constant factor a pass node multiplies by (``x * sqrt(d)``)
    negative_slope: float = 0.0
    output: Tensor | None = field(default=None, repr=False)
    input_shape: tuple[int, ...] = ()
    side_inputs: list[int] = field(default_factory=list)
    value_inputs: list[int] = field(default_factory=list)
    mixing_inputs: list[int] = field(default_factory=list)
    """Attention probabilities multiplied with the values (``softmax(q k^T) @ v``): they mix positions of the
    main input, the value, which is the path the signal's depth is counted along."""
    adds_depth: bool = True
    """Every application of a weight is one layer of depth (a module called again, a shared block, a weight
    applied in a loop); only a recurrent cell's calls after the first do not add depth: they are time steps,
    which ``arch.recurrent`` judges."""
    weight: Tensor | None = field(default=None, repr=False)  # the weight a functional layer applied
    fans: tuple[int, int] | None = None  # (fan_in, fan_out) of the op, for functional layers
    global_reduction: bool = False  # pools or selects away every position: (B, C, H, W) -> (B, C), x[:, 0]
    in_branch: bool = False  # a join inside a residual branch (FocalNet's sum over focal levels): not the stream
    signal: bool = True  # carries the input signal (not a constant computation such as a position-bias MLP)


@dataclass
class LayerInfo:
    """What the graph says about one parameterised module (aggregated over its calls).

    Attributes:
        name: qualified module name (for functional layers, the parameter's owner).
        kind: ``linear``, ``conv``, ``embedding``, ``recurrent``, ``attention`` or ``other``.
        activation: the activation applied to its output (looking past a normalization), None if linear.
        negative_slope: slope of a leaky ReLU activation (0 otherwise).
        normalized: a normalization layer consumes its output before any activation or other layer.
        feeds_join: its output directly enters a skip connection (it ends a residual branch).
        is_output: its output is (part of) the model output.
        feeds_layer: its output reaches another parameterised layer (it is a hidden layer).
        gate: its output only reaches the main path through a multiplicative gate (Squeeze-Excitation).
        attention_logits: its output only reaches attention logits (query/key projections), whose gradient
            is small at init by construction: the softmax is near-uniform.
        in_branch: it lies inside a residual branch (its output joins a skip connection as the branch).
        pre_norm_stream: an embedding whose output enters a residual stream un-normalized while the branches
            read it through a normalization (pre-LN Transformers).
        downstream_scale: constant factor applied to its output before the next op (``emb(x) * sqrt(d)``).
        calls: how often it ran in the forward pass (time steps for RNN cells, applications of a shared
            weight; each application of a non-recurrent weight is one layer of depth).
        input_shape: shape of its first input at the first call.
        fans: ``(fan_in, fan_out)`` derived from the op that applied it (functional layers: ``x @ W`` reads the
            contraction from the operand's layout), None to use ``torch.nn.init``'s convention on ``weight``.
        on_signal_path: its input derives from the model input (False for a position-bias MLP over constant
            coordinates, whose output is a constant at init).

    Example::

        layer = graph.layer("net.0")
        print(layer.activation, layer.normalized, layer.feeds_join)
    """

    name: str
    kind: str
    module: nn.Module | None = field(default=None, repr=False)
    weight: Tensor | None = field(default=None, repr=False)
    activation: str | None = None
    negative_slope: float = 0.0
    normalized: bool = False
    feeds_join: bool = False
    is_output: bool = False
    feeds_layer: bool = False
    gate: bool = False
    attention_logits: bool = False
    in_branch: bool = False
    pre_norm_stream: bool = False
    downstream_scale: float = 1.0
    calls: int = 0
    input_shape: tuple[int, ...] = ()
    fans: tuple[int, int] | None = None
    on_signal_path: bool = True


@dataclass
class ModelGraph:
    """The traced graph: nodes in execution order plus per-layer summaries and the longest plain chain.

    Example::

        graph, _ = trace(model, lambda batch: model(batch), inputs=x)
        print(graph.plain_depth, graph.skip_connections, [layer.name for layer in graph.layers])
    """

    nodes: list[Node]
    layers: list[LayerInfo]
    plain_chain: list[str]
    plain_chain_normalized: bool
    plain_chain_activations: list[str]
    skip_connections: int
    normalization_layers: list[str]
    untraced: list[str]
    problems: list[str]
    outputs: list[int] = field(default_factory=list)  # nodes whose tensors are (part of) the model output
    norm_gains: dict[str, float] = field(default_factory=dict)  # normalization -> its output RMS at init
    plain_applications: int = 0  # weight applications on the longest plain chain (a weight used twice counts 2)
    missed: dict[str, str] = field(default_factory=dict)  # weight -> the op that applied it, unread as a layer

    @property
    def plain_depth(self) -> int:
        """Number of weight applications on the longest plain chain (at least its distinct layers)."""
        return max(self.plain_applications, len(self.plain_chain))

    def layer(self, name: str) -> LayerInfo | None:
        """The layer summary for module ``name`` (None if it was not traced)."""
        return next((layer for layer in self.layers if layer.name == name), None)

    def chain_parent(self) -> list[int | None]:
        """For every node, the input along which its plain-chain depth was reached (None for sources)."""
        return _plain_chain_dp(self.nodes)[1]

    def consumers(self) -> list[list[int]]:
        """For every node, the nodes that read its output (main and side inputs)."""
        return _consumers(self.nodes)


class _Recorder(TorchFunctionMode):
    def __init__(self, tracer: GraphTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if self.tracer.depth == 0 and self.tracer.problem is None and not self.tracer.testing:
            try:
                self.tracer.record_function(func, args, kwargs, output)
            except Exception as error:  # tracing must never break the user's forward
                self.tracer.problem = f"recording {_op_name(func)} failed: {error!r}"
        return output


class GraphTracer:
    """Records a :class:`ModelGraph` while the wrapped forward runs (hooks removed on exit).

    ``on_layer_output(node, tensor)`` and ``on_activation(node, tensor)`` let the probe attach statistics and
    gradient hooks to the very tensors the graph sees.
    """

    def __init__(
        self,
        model: nn.Module,
        on_layer_output: Callable[[Node, Tensor], None] | None = None,
        on_activation: Callable[[Node, Tensor], None] | None = None,
    ) -> None:
        self.model = model
        self.on_layer_output = on_layer_output
        self.on_activation = on_activation
        self.nodes: list[Node] = []
        self.producers: dict[int, int] = {}
        self._alive: list[Tensor] = []  # keeps traced tensors alive so ids are never reused
        self.depth = 0
        self.testing = False  # True while a module is evaluated on probe inputs (nothing is recorded)
        self.problem: str | None = None
        self.module_names = {id(m): n for n, m in model.named_modules()}
        self.parameter_owner = {id(p): n.rsplit(".", 1)[0] if "." in n else n for n, p in model.named_parameters()}
        self.used_parameters: set[int] = set()
        self.recorded_modules: dict[str, nn.Module] = {}
        self.signal: list[bool] = []  # per node: carries the input signal (not a mask built from integer ids)
        self._roles: dict[int, tuple[str, float] | None] = {}  # module id -> behaviour, decided at first call
        self._entered: list[bool] = []  # per active pre-hook: whether it suppressed the module's internals
        self._called: set[str] = set()
        self.norm_gains: dict[str, float] = {}
        self._handles: list[Any] = []
        self.parameter_names = {id(p): n for n, p in model.named_parameters()}
        self.derived: dict[int, str] = {}  # tensors that are (a slice or a layout of) a weight -> the weight's name
        self.missed: dict[str, str] = {}  # weight -> the op that applied it to the signal unrecognised

    def register_inputs(self, inputs: Any) -> None:
        """Mark the tensors the forward starts from as graph inputs."""
        for tensor in tree_leaves(inputs):
            if isinstance(tensor, Tensor):
                node = self._new_node("input", "input", "input", [], signal=tensor.is_floating_point())
                self._register_outputs(node, tensor)

    @contextmanager
    def tracing(self) -> Iterator[GraphTracer]:
        """Install hooks and the function mode for the duration of the block."""
        try:
            for module in self.model.modules():
                if self._may_record(module):
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook))
                    self._handles.append(module.register_forward_hook(self._post_hook))
        except Exception as error:  # e.g. TorchScript modules refuse Python hooks
            self.problem = f"module hooks unavailable ({type(self.model).__name__}): {error}"
            self._remove_hooks()
        try:
            if self.problem is None:
                with _Recorder(self):
                    yield self
            else:
                yield self
        finally:
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _may_record(self, module: nn.Module) -> bool:
        if layer_kind(module) or isinstance(module, NORM_TYPES) or _activation_module_name(module):
            return True
        if isinstance(module, (nn.modules.dropout._DropoutNd, nn.Identity)) or module is self.model:
            return False  # the model itself is never one opaque layer: its forward is what we trace
        return next(module.children(), None) is None  # leaves: decided by what they compute at the first call

    def _role(self, module: nn.Module, args: tuple) -> tuple[str, float] | None:
        """How a module is recorded: ``("layer"|"norm"|"activation"|..., slope)``, None to trace its internals."""
        if id(module) in self._roles:
            return self._roles[id(module)]
        activation = _activation_module_name(module)
        if layer_kind(module):
            role: tuple[str, float] | None = ("layer", 0.0)
        elif isinstance(module, NORM_TYPES):
            role = ("norm", 0.0)
        elif activation:
            role = ("activation", float(getattr(module, "negative_slope", 0.0)))
        else:
            self.testing = True
            try:
                with torch._C.DisableTorchFunction():  # probing its behaviour is no part of the model's graph
                    role = self._leaf_role(module, args)
            finally:
                self.testing = False
        self._roles[id(module)] = role
        return role

    def _leaf_role(self, module: nn.Module, args: tuple) -> tuple[str, float] | None:
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is None:
            return None
        parameters = list(module.parameters(recurse=False))
        gain = norm_gain(module, args) if parameters and all(p.dim() <= 1 for p in parameters) else None
        if gain is not None:
            return ("norm", gain)  # norm classes carry per-feature gains; parameter-free ones call F.*_norm
        if parameters and all(p.dim() <= 1 for p in parameters):
            scale = affine_gain(module, args)
            if scale is not None:
                return ("scale", scale)  # LayerScale, ReZero gates, per-channel affine blocks: measured through
            return ("layer", 0.0)
        if parameters:
            return None  # an unfamiliar layer class: its weights are read where its forward applies them
        torch_builtin = type(module).__module__.startswith("torch.nn.")  # pooling, padding, ...: traced inside
        if not torch_builtin and next(module.buffers(recurse=False), None) is None and len(args) == 1:
            behaviour = classify_elementwise(module, first)
            if behaviour is not None:
                return (f"activation:{behaviour[0]}", behaviour[1])
        return None

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if self.testing:
            return
        entered = False
        if self.depth == 0 and self.problem is None:
            try:
                entered = self._role(module, tuple(args) if isinstance(args, tuple) else (args,)) is not None
            except Exception as error:
                self.problem = f"classifying module {type(module).__name__} failed: {error!r}"
        elif self.depth > 0:
            entered = True
        self._entered.append(entered)
        self.depth += int(entered)

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.testing:
            return
        entered = self._entered.pop() if self._entered else False
        if not entered:
            return
        self.depth -= 1
        if self.depth != 0 or self.problem is not None:
            return
        try:
            self._record_module(module, args, output)
        except Exception as error:
            self.problem = f"recording module {type(module).__name__} failed: {error!r}"

    def _record_module(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self.module_names.get(id(module), type(module).__name__)
        self.recorded_modules[name] = module
        role, slope = self._roles[id(module)] or ("layer", 0.0)
        inputs = self._traced_inputs(args)
        if role.startswith("activation"):
            op = role.split(":", 1)[1] if ":" in role else _activation_module_name(module) or "relu"
            node = self._new_node("activation", name, op, self._signal_only(inputs))
            node.negative_slope = slope
        elif role == "norm":
            node = self._new_node("norm", name, type(module).__name__, self._signal_only(inputs))
            if not isinstance(module, NORM_TYPES):
                self.norm_gains.setdefault(name, slope)  # measured by behaviour at the first call
        elif role == "scale":
            node = self._new_node("pass", name, "scale", self._signal_only(inputs))
            node.scale = slope  # the gain measured at the first call
        else:
            kind = layer_kind(module) or "other"
            node = self._new_node("layer", name, type(module).__name__, inputs, signal=self._layer_signal(kind, inputs))
            node.layer_kind = kind
            node.adds_depth = name not in self._called or kind != "recurrent"
            self._called.add(name)
        first_input = next((t for t in _leaves(args) if isinstance(t, Tensor)), None)
        node.input_shape = tuple(first_input.shape) if first_input is not None else ()
        self._register_outputs(node, output)

    def _layer_signal(self, kind: str, inputs: list[int]) -> bool:
        """A layer carries the signal when one of its inputs does; an embedding starts it from integer ids. A
        layer over constants only (a position-bias MLP over a coordinate table) computes a constant at init."""
        return kind == "embedding" or any(self.signal[i] for i in inputs)

    def _weight_name(self, tensor: Tensor) -> str | None:
        """The name of the weight ``tensor`` is, or is a slice or re-layout of (``W[i].T``), else None."""
        if id(tensor) in self.derived:
            return self.derived[id(tensor)]
        cursor: Tensor | None = tensor
        while cursor is not None:
            if id(cursor) in self.parameter_names:
                return self._layer_name(self.parameter_names[id(cursor)])
            cursor = cursor._base
        return None

    @staticmethod
    def _layer_name(parameter: str) -> str:
        """A module's ``weight`` is the module (``blocks.0.fc``); any other parameter is itself (``w.3``,
        ``attn.W_q``), so two weights of one module applied in forward are two layers."""
        owner, _, attribute = parameter.rpartition(".")
        return owner if attribute == "weight" and owner else parameter

    def _derive_weights(self, op: str, args: tuple, weights: list[str], output: Any) -> None:
        """Remember the outputs of an op on weights alone as weights: ``W[i]``, ``W.T``, ``W.unbind(0)``."""
        name = weights[0]
        index = args[1] if len(args) > 1 and op in ("getitem", "select") else None
        if op == "select" and len(args) > 2:
            index = args[2]
        if isinstance(index, tuple) and index and isinstance(index[0], int):
            index = index[0]
        tensors = [t for t in tree_leaves(output) if isinstance(t, Tensor)]
        for position, tensor in enumerate(tensors):
            suffix = f"[{index}]" if isinstance(index, int) else (f"[{position}]" if op in ("unbind", "chunk", "split")
                                                                   else "")
            self.derived[id(tensor)] = name + suffix
            self._alive.append(tensor)

    def record_function(self, func: Callable, args: tuple, kwargs: dict, output: Any) -> None:
        """Record one functional call seen outside the recorded modules."""
        leaves = [leaf for leaf in _leaves(args) if isinstance(leaf, Tensor)]
        if kwargs:
            leaves += [leaf for leaf in tree_leaves(kwargs) if isinstance(leaf, Tensor)]
        if not any(isinstance(leaf, Tensor) for leaf in _leaves(output)):
            return
        op = _op_name(func)
        owned = [leaf for leaf in leaves if id(leaf) in self.parameter_owner]
        self.used_parameters.update(id(p) for p in owned)
        weights = [(leaf, name) for leaf in leaves if (name := self._weight_name(leaf)) is not None]
        traced = self._traced_inputs(leaves)
        if weights and not traced:
            # the weights taken apart or combined before use (W[i], W.T, torch.stack): still weights
            self._derive_weights(op, args, [name for _, name in weights], output)
            return
        if weights and op in _FUNCTIONAL_LAYERS:
            self._record_functional_layer(op, args, weights, traced, leaves, output)
            return
        inputs = self._signal_only(traced)
        if not inputs:
            return  # a constant computation (masks, positions): not part of the signal path
        if op in ACTIVATION_FAMILY:
            node = self._new_node("activation", f"F.{op}", op, inputs)
            slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
            node.negative_slope = float(slope) if op == "leaky_relu" and isinstance(slope, (int, float)) else 0.0
        elif op in NORM_FUNCTIONS:
            node = self._new_node("norm", f"F.{op}", op, inputs)
        elif op == "mul" and len(inputs) >= 2 and (gated := self._gate_split(leaves, inputs, output)):
            main, gates = gated
            node = self._new_node("pass", op, op, main)
            node.side_inputs = gates
        elif op in _JOINS and len(inputs) >= 2:
            node = self._new_node("join", op, op, inputs)
        elif op in _PASS_THROUGH or (op in _JOINS | _SCALINGS | _DIFFERENCES and len(inputs) == 1):
            node = self._new_node("pass", op, op, inputs)
            if op in _SCALINGS:
                node.scale = _constant_factor(op, args, self.producers, self._is_weight)
        elif op == "addcmul" and len(inputs) == 1:  # beta + alpha * x (ResMLP's Affine written inline)
            node = self._new_node("pass", op, op, inputs)
            factors = [a for a in args[1:3] if isinstance(a, Tensor) and id(a) not in self.producers]
            node.scale = float(factors[0].detach().double().square().mean().sqrt()) if factors else 1.0
        else:
            node = self._new_node("op", op, op, inputs)
            if op == "scaled_dot_product_attention":
                value = kwargs.get("value", args[2] if len(args) > 2 else None)
                node.value_inputs = self._traced_inputs([value]) if isinstance(value, Tensor) else []
            elif op in ("matmul", "bmm", "einsum") and len(inputs) >= 2:
                node.mixing_inputs = [i for i in inputs if self._from_softmax(i)]
            applied = args[:3] if op == "scaled_dot_product_attention" else leaves  # its mask is an additive bias
            for leaf, name in weights:
                if sum(size > 1 for size in leaf.shape) >= 2 and any(leaf is a for a in applied):
                    self.missed.setdefault(name, op)  # a weight applied by an op we do not read as a layer
        first = next((leaf for leaf in leaves if id(leaf) in self.producers), None)
        if node.kind in ("pass", "op") and first is not None and isinstance(output, Tensor):
            node.global_reduction = _pools_positions(first, output)
        self._register_outputs(node, output)

    def _is_weight(self, tensor: Tensor) -> bool:
        return self._weight_name(tensor) is not None

    def _record_functional_layer(
        self, op: str, args: tuple, weights: list[tuple[Tensor, str]], traced: list[int], leaves: list[Tensor],
        output: Any,
    ) -> None:
        """One application of a weight by a functional op: a layer node named after the weight, with the
        fan-in/fan-out read from the op (``x @ W`` contracts ``W``'s first axis, ``F.linear`` its last)."""
        weight, name = next(((w, n) for w, n in weights if w.dim() >= 2), weights[0])  # addmm's bias comes first
        kind = _FUNCTIONAL_LAYERS[op]
        if kind == "attention":  # one attention layer over its projections: named after their common owner
            owners = [n.split(".") for _, n in weights]
            common = [parts[0] for parts in zip(*owners, strict=False) if len(set(parts)) == 1]
            name = ".".join(common) or name
        self.used_parameters.update(id(p) for p, _ in weights)
        node = self._new_node("layer", name, op, traced, signal=self._layer_signal(kind, traced))
        node.layer_kind = kind
        signal_leaf = next((leaf for leaf in leaves if id(leaf) in self.producers), leaves[0])
        node.input_shape = tuple(signal_leaf.shape)
        node.adds_depth = name not in self._called or kind != "recurrent"
        node.weight = weight
        node.fans = _op_fans(op, args, weight)
        self._called.add(name)
        self._register_outputs(node, output)

    def _gate_split(self, leaves: list[Tensor], inputs: list[int], output: Any) -> tuple[list[int], list[int]] | None:
        """Split a product of traced tensors into the main path and gates: a gate is broadcast against the
        output (Squeeze-Excitation's per-channel scale) or comes from a sigmoid-family activation."""
        if not isinstance(output, Tensor):
            return None
        shape_of = {self.producers[id(t)]: tuple(t.shape) for t in leaves if id(t) in self.producers}
        main, gates = [], []
        for producer in inputs:
            full = shape_of.get(producer) == tuple(output.shape)
            (main if full and not self._is_gate(producer) else gates).append(producer)
        return (main, gates) if main and gates else None

    def _from_softmax(self, index: int) -> bool:
        node = self.nodes[index]
        while node.kind == "pass" and node.inputs:
            node = self.nodes[node.inputs[0]]
        return node.kind == "activation" and node.op in ("softmax", "log_softmax", "softmin")

    def _is_gate(self, index: int) -> bool:
        node = self.nodes[index]
        while node.kind == "pass" and node.inputs:
            node = self.nodes[node.inputs[0]]
        return node.kind == "activation" and activation_family(node.op) == "sigmoid"

    def _signal_only(self, inputs: list[int]) -> list[int]:
        return [i for i in inputs if self.signal[i]]

    def _traced_inputs(self, values: Any) -> list[int]:
        inputs: list[int] = []
        for leaf in _leaves(values):
            if isinstance(leaf, Tensor) and id(leaf) in self.producers:
                producer = self.producers[id(leaf)]
                if producer not in inputs:
                    inputs.append(producer)
        return inputs

    def _new_node(self, kind: str, name: str, op: str, inputs: list[int], signal: bool | None = None) -> Node:
        node = Node(len(self.nodes), kind, name, op, inputs)
        self.nodes.append(node)
        self.signal.append(any(self.signal[i] for i in inputs) if signal is None else signal)
        node.signal = self.signal[-1]
        return node

    def _register_outputs(self, node: Node, output: Any) -> None:
        tensors = [t for t in _leaves(output) if isinstance(t, Tensor)]
        for tensor in tensors:
            self.producers[id(tensor)] = node.index
            self._alive.append(tensor)
        if tensors:
            node.output = tensors[0]
            self.testing = True  # the probe's statistics are not part of the model's graph
            try:
                with torch._C.DisableTorchFunction():  # nor dispatched through the recorder
                    if node.kind in ("layer", "join") and self.on_layer_output is not None:
                        self.on_layer_output(node, tensors[0])
                    if node.kind == "activation" and self.on_activation is not None:
                        self.on_activation(node, tensors[0])
            finally:
                self.testing = False

    def build(self, output: Any) -> ModelGraph:
        """Summarise the recorded nodes into a :class:`ModelGraph` (call after the forward)."""
        output_nodes = set(self._traced_inputs(output))
        graph = build_graph(self.nodes, output_nodes, self._resolve_weights())
        graph.untraced = self._untraced_parameters()
        graph.norm_gains = {**self._affine_gains(), **self.norm_gains}
        if self.problem:
            graph.problems.append(self.problem)
        applied = {layer.name for layer in graph.layers}
        missed = {name: op for name, op in self.missed.items() if name not in applied}
        graph.missed = missed
        if missed:
            graph.problems.append(
                "weights applied to the signal by ops not read as layers (their depth and scale are not judged): "
                + ", ".join(f"{name} ({op})" for name, op in missed.items())
            )
        self.derived.clear()
        self._alive.clear()
        self.producers.clear()
        return graph

    def _affine_gains(self) -> dict[str, float]:
        """The gain of every recorded torch normalization: the RMS of its affine weight (1 without one)."""
        weighted = {
            name: module.weight for name, module in self.recorded_modules.items()
            if isinstance(module, NORM_TYPES) and isinstance(getattr(module, "weight", None), Tensor)
        }
        gains = {name: 1.0 for name, m in self.recorded_modules.items() if isinstance(m, NORM_TYPES)}
        if weighted:
            rms = torch.stack([w.detach().float().square().mean().sqrt().cpu() for w in weighted.values()])
            gains.update(zip(weighted, rms.tolist(), strict=True))  # one host sync
        return gains

    def _resolve_weights(self) -> dict[str, tuple[nn.Module | None, Tensor | None]]:
        resolved: dict[str, tuple[nn.Module | None, Tensor | None]] = {}
        modules = dict(self.model.named_modules())
        parameters = dict(self.model.named_parameters())
        for node in self.nodes:
            if node.kind != "layer" or node.name in resolved:
                continue
            if node.weight is not None:  # a functional application: the very tensor it applied
                resolved[node.name] = (modules.get(node.name), node.weight)
                continue
            module = modules.get(node.name)
            weight = getattr(module, "weight", None) if module is not None else None
            if weight is None and module is not None:
                weight = next((p for n, p in module.named_parameters() if "weight_hh" in n or "in_proj" in n), None)
            if weight is None:
                weight = parameters.get(f"{node.name}.weight") or parameters.get(node.name)
            resolved[node.name] = (module, weight if isinstance(weight, Tensor) else None)
        return resolved

    def _untraced_parameters(self) -> list[str]:
        # by identity: a parameter tied into a recorded module (a shared embedding / lm_head) is seen
        seen = set(self.used_parameters)
        recorded = set(self.recorded_modules)
        named = list(self.model.named_parameters(remove_duplicate=False))
        for name, parameter in named:
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            while owner:  # a parameter of a recorded module or of one of its submodules
                if owner in recorded:
                    seen.add(id(parameter))
                    break
                owner = owner.rsplit(".", 1)[0] if "." in owner else ""
        return list(dict.fromkeys(name for name, parameter in named if id(parameter) not in seen))


def _op_fans(op: str, args: tuple, weight: Tensor) -> tuple[int, int] | None:
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


def _pools_positions(source: Tensor, output: Tensor) -> bool:
    """Whether an op pools or selects away every position of a (B, C, ...) or (B, T, D) signal, leaving one
    vector of features per sample: a global pool, ``x.mean(1)``, the class token ``x[:, 0]``. Deltas on the two
    sides of it are not comparable (the pool divides the per-position gradient by the number of positions)."""
    if source.dim() < 3 or output.numel() >= source.numel() or output.dim() < 1:
        return False
    per_sample = output.numel() // max(int(source.shape[0]), 1)
    return output.numel() % max(int(source.shape[0]), 1) == 0 and per_sample in (source.shape[1], source.shape[-1])


def _constant_factor(op: str, args: tuple, traced: dict[int, int], is_weight: Callable[[Tensor], bool]) -> float:
    numbers = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    # an untraced tensor factor is a constant at init: a 0-d normalizer (Gemma's sqrt(d)) or a parameter vector
    # (LayerScale's gamma, 1e-6 in ConvNeXt), counted by its root-mean-square
    numbers += [
        float(a.detach().float().square().mean().sqrt()) for a in args
        if isinstance(a, Tensor) and id(a) not in traced and a.is_floating_point()
        and (a.numel() == 1 or is_weight(a))
    ]
    if not numbers:
        return 1.0
    value = float(numbers[0])
    if op == "mul":
        return abs(value)
    divides_tensor = args and isinstance(args[0], Tensor) and id(args[0]) in traced
    return abs(1.0 / value) if value != 0 and divides_tensor else 1.0


def _consumers(nodes: list[Node]) -> list[list[int]]:
    consumers: list[list[int]] = [[] for _ in nodes]
    for node in nodes:
        for i in dict.fromkeys(node.inputs + node.side_inputs):
            consumers[i].append(node.index)
    return consumers


def _plain_chain_dp(nodes: list[Node]) -> tuple[list[int], list[int | None]]:
    """Plain-chain depth of every node: distinct layers crossed on the shortest-cut path from the inputs.

    A join takes the *smallest* depth of its inputs (the skip offers that shorter path); every other node
    the largest of its main inputs (a gate's branch is off the main path). Embeddings are lookups, and a
    module called again (an RNN cell per time step, a layer shared across depth) is the same layer: neither
    adds depth.
    """
    depth: list[int] = []
    parent: list[int | None] = []
    for node in nodes:
        if node.inputs:
            choose = min if node.kind == "join" else max
            main = node.value_inputs or [i for i in node.inputs if i not in node.mixing_inputs] or node.inputs
            best = choose(main, key=lambda i: depth[i])
            base = depth[best]
        else:
            best, base = None, 0
        adds = node.kind == "layer" and node.layer_kind != "embedding" and node.adds_depth and node.signal
        depth.append(base + int(adds))
        parent.append(best)
    return depth, parent


def build_graph(
    nodes: list[Node],
    output_nodes: set[int],
    weights: dict[str, tuple[nn.Module | None, Tensor | None]],
) -> ModelGraph:
    """Derive per-layer summaries, skip connections and the longest plain chain from recorded nodes."""
    _demote_arithmetic_joins(nodes)
    consumers = _consumers(nodes)
    gated = {i for node in nodes for i in node.side_inputs}
    # the path questions below walk to the output from every layer: asked only where their answer can be yes
    attends = any(n.op in ("softmax", "log_softmax", "scaled_dot_product_attention") for n in nodes)
    joins = any(n.kind == "join" for n in nodes)
    parent = _plain_chain_dp(nodes)[1]
    layers: dict[str, LayerInfo] = {}
    for node in nodes:
        if node.kind != "layer":
            continue
        module, weight = weights.get(node.name, (None, None))
        info = layers.setdefault(node.name, LayerInfo(node.name, node.layer_kind or "other", module, weight))
        info.calls += 1
        if info.calls == 1:
            info.input_shape = node.input_shape
            info.fans = node.fans
            info.on_signal_path = node.signal
            _describe_consumers(info, node, nodes, consumers, output_nodes)
            info.is_output |= _reaches_output_directly(node.index, nodes, consumers, output_nodes)
            info.gate = bool(gated) and _only_reaches(node.index, nodes, consumers, gated, "gate", output_nodes)
            info.attention_logits = attends and not info.is_output and _only_reaches(
                node.index, nodes, consumers, gated, "logits", output_nodes
            )
            info.in_branch = joins and _in_branch(node.index, nodes, consumers, parent, output_nodes)
            if info.kind == "embedding":
                info.pre_norm_stream = _pre_norm_stream(node.index, nodes, consumers)
    for node in nodes:
        if node.kind == "join":
            node.in_branch = _in_branch(node.index, nodes, consumers, parent, output_nodes)
    chain, normalized, activations, applications = _longest_plain_chain(nodes)
    norms = list(dict.fromkeys(n.name for n in nodes if n.kind == "norm"))
    return ModelGraph(
        nodes=nodes,
        layers=list(layers.values()),
        plain_chain=chain,
        plain_chain_normalized=normalized,
        plain_chain_activations=activations,
        skip_connections=sum(1 for n in nodes if n.kind == "join"),
        normalization_layers=norms,
        untraced=[],
        problems=[],
        outputs=sorted(output_nodes),
        plain_applications=applications,
    )


def _demote_arithmetic_joins(nodes: list[Node]) -> None:
    """Turn every join whose inputs crossed the same number of layers into a plain op, in place.

    An add/cat of such paths is arithmetic (rotary embeddings, x*cos + rot(x)*sin), not a skip connection: a
    skip bypasses at least one layer.
    """
    depth_before, _ = _plain_chain_dp(nodes)
    for node in nodes:
        if node.kind == "join" and len({depth_before[i] for i in node.inputs}) == 1:
            node.kind = "op"


def _longest_plain_chain(nodes: list[Node]) -> tuple[list[str], bool, list[str], int]:
    """Walk back from the deepest node along the plain-chain parents: the distinct layers crossed (input first),
    whether a normalization lies on the way, the activations met (input first) and the weight applications."""
    depth, parent = _plain_chain_dp(nodes)
    chain: list[str] = []
    applications = max(depth, default=0)
    normalized = False
    activations: list[str] = []
    if nodes:
        cursor: int | None = max(range(len(nodes)), key=lambda i: depth[i])
        while cursor is not None:
            node = nodes[cursor]
            if node.kind == "layer" and node.layer_kind != "embedding" and node.adds_depth and node.signal:
                chain.append(node.name)
            normalized |= node.kind == "norm"
            if node.kind == "activation":
                activations.append(node.op)
            cursor = parent[cursor]
    return list(dict.fromkeys(chain[::-1])), normalized, activations[::-1], applications


def _describe_consumers(
    info: LayerInfo, node: Node, nodes: list[Node], consumers: list[list[int]], output_nodes: set[int]
) -> None:
    """Walk from a layer's output through pass-through ops to what really consumes it."""
    frontier: list[tuple[int, bool]] = [(node.index, False)]  # (node, a normalization lies behind us)
    seen: set[tuple[int, bool]] = set()
    while frontier:
        index, past_norm = frontier.pop(0)
        if (index, past_norm) in seen:
            continue
        seen.add((index, past_norm))
        if index in output_nodes:
            info.is_output = True
        for consumer_index in consumers[index]:
            consumer = nodes[consumer_index]
            if consumer.kind == "pass":
                if not past_norm and index in consumer.inputs:
                    info.downstream_scale *= consumer.scale
                if index in consumer.inputs:
                    frontier.append((consumer_index, past_norm))
                else:  # the layer's output gates another path
                    info.feeds_layer |= _reaches_layer(consumer_index, nodes, consumers)
            elif consumer.kind == "norm" and not past_norm and info.activation is None:
                info.normalized = True
                frontier.append((consumer_index, True))
            elif consumer.kind == "activation" and info.activation is None:
                info.activation = consumer.op
                info.negative_slope = consumer.negative_slope
                info.feeds_layer |= _reaches_layer(consumer_index, nodes, consumers)
            elif consumer.kind == "join" and not past_norm:
                info.feeds_join = True
            elif consumer.kind == "layer":
                info.feeds_layer = True
            elif consumer.kind in ("op", "norm", "activation", "join"):
                info.feeds_layer |= _reaches_layer(consumer_index, nodes, consumers)


def _reaches_output_directly(start: int, nodes: list[Node], consumers: list[list[int]], outputs: set[int]) -> bool:
    """Whether a path from ``start`` reaches a model output without crossing another layer or a skip connection:
    the layer is an output layer even when a softcap (``c * tanh(x / c)``), an average of heads or a loss
    computed in ``forward`` (``(pred - target).pow(2).mean()``) follows it. Its gain scales every delta alike,
    so it is no reference point for depth."""
    frontier, seen = [start], set()
    while frontier:
        index = frontier.pop()
        if index in seen:
            continue
        seen.add(index)
        if index in outputs:
            return True
        frontier.extend(
            c for c in consumers[index] if nodes[c].kind not in ("layer", "join") and index in nodes[c].inputs
        )
    return False


def _reaches_layer(start: int, nodes: list[Node], consumers: list[list[int]]) -> bool:
    frontier, seen = [start], set()
    while frontier:
        index = frontier.pop()
        if index in seen:
            continue
        seen.add(index)
        for consumer_index in consumers[index]:
            if nodes[consumer_index].kind == "layer":
                return True
            frontier.append(consumer_index)
    return False


_PathStep = Literal["follow", "found", "fail", "stop"]
"""What one edge ``index -> consumer`` means to :func:`_every_path_ends`: walk on through the consumer, a path
ends well here, the answer is False, or this path ends here without counting either way."""


def _every_path_ends(
    start: int, consumers: list[list[int]], outputs: set[int], step: Callable[[int, int], _PathStep]
) -> bool:
    """Walk forward from ``start`` and say whether at least one path ends ``"found"`` while none reaches a model
    output or a ``"fail"`` edge; ``step(index, consumer_index)`` judges each edge. Shared by the branch, gate and
    attention-logit questions, which differ only in what ends a path."""
    frontier, seen, found = [start], set(), False
    while frontier:
        index = frontier.pop()
        if index in seen:
            continue
        seen.add(index)
        if index in outputs:
            return False
        for consumer_index in consumers[index]:
            verdict = step(index, consumer_index)
            if verdict == "fail":
                return False
            if verdict == "found":
                found = True
            elif verdict == "follow":
                frontier.append(consumer_index)
    return found


def _in_branch(
    start: int, nodes: list[Node], consumers: list[list[int]], parent: list[int | None], outputs: set[int]
) -> bool:
    """Whether every path from ``start`` enters some join as a branch before it reaches the output: the layer (or
    join) sits inside a residual branch. A join entered as its stream is walked through, so the running sum of
    a branch's own accumulation (FocalNet's focal levels) is inside the branch that finally joins the stream."""

    def step(index: int, consumer_index: int) -> _PathStep:
        consumer = nodes[consumer_index]
        if consumer.kind == "join":
            return "follow" if parent[consumer_index] == index else "found"
        return "follow" if index in consumer.inputs else "stop"

    return _every_path_ends(start, consumers, outputs, step)


def _only_reaches(
    start: int, nodes: list[Node], consumers: list[list[int]], gated: set[int], what: str, outputs: set[int]
) -> bool:
    """Whether every path from ``start`` (through non-layer nodes) ends in a gate (``what="gate"``: a side input
    of a gated product) or in attention logits (``what="logits"``: a softmax, or the query/key of a fused
    attention call), with at least one such path."""

    def step(index: int, consumer_index: int) -> _PathStep:
        consumer = nodes[consumer_index]
        softmax = consumer.kind == "activation" and consumer.op in ("softmax", "log_softmax")
        if (what == "gate" and index in consumer.side_inputs) or (what == "logits" and softmax):
            return "found"
        if what == "logits" and consumer.op == "scaled_dot_product_attention":
            return "fail" if index in consumer.value_inputs else "found"
        if consumer.kind == "layer" and what == "logits":
            return "fail"
        return "follow"

    return _every_path_ends(start, consumers, outputs, step)


def _pre_norm_stream(start: int, nodes: list[Node], consumers: list[list[int]]) -> bool:
    """An embedding output that, summed with other embeddings at most, is both read through a normalization
    and carried un-normalized into a residual join with a branch (the pre-LN residual stream)."""
    has_norm = [False] * len(nodes)
    for node in nodes:
        has_norm[node.index] = node.kind == "norm" or any(has_norm[i] for i in node.inputs)
    frontier, seen = [start], set()
    feeds_norm = residual = False
    while frontier:
        index = frontier.pop()
        if index in seen:
            continue
        seen.add(index)
        for consumer_index in consumers[index]:
            consumer = nodes[consumer_index]
            if consumer.kind == "norm":
                feeds_norm = True
            elif consumer.kind == "join":
                residual |= any(has_norm[i] for i in consumer.inputs if i != index)
                frontier.append(consumer_index)
            elif (consumer.kind == "pass" and index in consumer.inputs) or consumer.op in _JOINS:
                frontier.append(consumer_index)
    return feeds_norm and residual


def trace(model: nn.Module, forward: Callable[[Any], Any], inputs: Any = None) -> tuple[ModelGraph, Any]:
    """Run ``forward(inputs)`` once under the tracer and return ``(graph, output)`` (no backward).

    Example::

        graph, output = trace(model, lambda batch: model(batch), inputs=x)
    """
    tracer = GraphTracer(model)
    tracer.register_inputs(inputs)
    with tracer.tracing():
        output = forward(inputs)
    return tracer.build(output), output
