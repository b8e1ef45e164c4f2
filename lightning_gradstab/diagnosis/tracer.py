"""Recording the graph from one real forward pass.

The module tree alone misses what ``forward`` does with functional calls (``F.relu``, ``x.sigmoid()``,
``x + block(x)``, ``x @ W[i].T``), and ``torch.fx`` fails on data-dependent code. So we run the real forward once
with forward hooks on the modules we understand (layers, normalizations, activation modules), which are recorded
as single nodes, and a ``TorchFunctionMode`` that records every functional call between them. Tensors are
matched to the node that produced them by identity; weights are followed through slices and re-layouts to the op
that applies them, and every application is a layer.

Modules we do not know by class are recognised by what they compute, at their first call: a leaf whose output
does not change when its input is scaled is a normalization (RMSNorm classes, T5's layer norm), one that computes
``scale * x + bias`` is a deliberate scaling (LayerScale, SkipInit gates, affine blocks), a parameter-free
elementwise leaf is classified as a sigmoid-, tanh- or ReLU-like activation on a grid (so GELU-tanh's internal add
and tanh are not read as structure), and any other parameterised leaf is traced inside. A product whose factor is
broadcast or comes from a sigmoid-family activation is a gate (Squeeze-Excitation), off the main path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_gradstab.diagnosis.behaviour import classify_elementwise, scaling_behaviour
from lightning_gradstab.diagnosis.graph import ModelGraph, build_graph
from lightning_gradstab.diagnosis.in_place import writes_in_place, written_tensors
from lightning_gradstab.diagnosis.nodes import Node
from lightning_gradstab.diagnosis.ops import (
    ACTIVATION_FAMILY,
    DIFFERENCES,
    FUNCTIONAL_LAYERS,
    JOINS,
    NORM_FUNCTIONS,
    NORM_TYPES,
    PASS_THROUGH,
    SCALINGS,
    activation_family,
    activation_module_name,
    constant_factor,
    layer_kind,
    op_fans,
    op_name,
    pools_positions,
    pytree_leaves,
)

_UNDECIDED = object()


class _Recorder(TorchFunctionMode):
    def __init__(self, tracer: GraphTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        if tracer.on_mutation is not None and writes_in_place(func, args, kwargs):
            # the outputs recorded so far are read before this call can overwrite them
            tracer.on_mutation(written_tensors(func, args, kwargs))
        output = func(*args, **kwargs)
        # shapes, sizes, dtypes, flags: most calls a model makes return no tensor, and are no node
        if type(output) not in _NO_TENSOR and tracer.depth == 0 and tracer.problem is None and not tracer.testing:
            try:
                tracer.record_function(func, args, kwargs, output)
            except Exception as error:  # tracing must never break the user's forward
                tracer.problem = f"recording {op_name(func)} failed: {error!r}"
        return output


_NO_TENSOR = frozenset({int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device})
"""Types of call results that hold no tensor (``x.shape``, ``x.size(0)``, ``x.dtype``, ``x.is_floating_point()``)."""


class GraphTracer:
    """Records a :class:`ModelGraph` while the wrapped forward runs (hooks removed on exit).

    ``on_layer_output(node, tensor)`` and ``on_activation(node, tensor)`` let the probe remember the very
    tensors the graph sees; ``on_mutation(tensors)`` is called before any call that may write a tensor in place
    (with the tensors it may write, None when any argument may be), so statistics the probe defers are read
    before the values change.
    """

    def __init__(
        self,
        model: nn.Module,
        on_layer_output: Callable[[Node, Tensor], None] | None = None,
        on_activation: Callable[[Node, Tensor], None] | None = None,
        on_mutation: Callable[[list[Any] | None], None] | None = None,
    ) -> None:
        self.model = model
        self.on_layer_output = on_layer_output
        self.on_activation = on_activation
        self.on_mutation = on_mutation
        self.nodes: list[Node] = []
        self.producers: dict[int, int] = {}
        self._alive: list[Tensor] = []  # keeps traced tensors alive so ids are never reused
        self.depth = 0
        self.testing = False  # True while a module is evaluated on probe inputs (nothing is recorded)
        self.problem: str | None = None
        # the model is walked once: named_modules/named_parameters recurse through generators on every call
        self.modules: list[tuple[str, nn.Module]] = list(model.named_modules())
        self.parameters: list[tuple[str, nn.Parameter]] = list(model.named_parameters())
        self.module_names = {id(m): n for n, m in self.modules}
        self.parameter_owner = {id(p): n.rsplit(".", 1)[0] if "." in n else n for n, p in self.parameters}
        self.used_parameters: set[int] = set()
        self.recorded_modules: dict[str, nn.Module] = {}
        self.signal: list[bool] = []  # per node: carries the input signal (not a mask built from integer ids)
        self._roles: dict[int, tuple[str, float] | None] = {}  # module id -> behaviour, decided at first call
        self._plans: dict[int, tuple[str, str, str, str | None, float]] = {}  # module id -> see _plan
        self._behaviours: dict[tuple, tuple[str, float] | None] = {}  # see _behaviour_key
        # per active pre-hook: 0, or 1 when it suppressed the module's internals (2: with the function mode off)
        self._entered: list[int] = []
        self._disablers: list[Any] = []  # DisableTorchFunction contexts entered by pre-hooks, exited by post-hooks
        self._builtin: dict[type, bool] = {}
        self._called: set[str] = set()
        self.norm_gains: dict[str, float] = {}
        self._handles: list[Any] = []
        self.parameter_names = {id(p): n for n, p in self.parameters}
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
            for _, module in self.modules:
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
            while self._disablers:  # a forward that raised inside a module: its post-hook never ran
                self._disablers.pop().__exit__(None, None, None)
            self._entered.clear()
            self.depth = 0

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _may_record(self, module: nn.Module) -> bool:
        if layer_kind(module) or isinstance(module, NORM_TYPES) or activation_module_name(module):
            return True
        if isinstance(module, (nn.modules.dropout._DropoutNd, nn.Identity)) or module is self.model:
            return False  # the model itself is never one opaque layer: its forward is what we trace
        return next(module.children(), None) is None  # leaves: decided by what they compute at the first call

    def _role(self, module: nn.Module, args: tuple) -> tuple[str, float] | None:
        """How a module is recorded: ``("layer"|"norm"|"activation"|..., slope)``, None to trace its internals."""
        if id(module) in self._roles:
            return self._roles[id(module)]
        activation = activation_module_name(module)
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
        if parameters and all(p.dim() <= 1 for p in parameters):
            # a normalization (norm classes carry per-feature gains; parameter-free ones call F.*_norm), or a
            # LayerScale, ReZero gate, per-channel affine block: measured through; else a layer
            return scaling_behaviour(module, args) or ("layer", 0.0)
        if parameters:
            return None  # an unfamiliar layer class: its weights are read where its forward applies them
        torch_builtin = type(module).__module__.startswith("torch.nn.")  # pooling, padding, ...: traced inside
        if not torch_builtin and next(module.buffers(recurse=False), None) is None and len(args) == 1:
            key = _behaviour_key(module, first)
            if key is not None and key in self._behaviours:
                behaviour = self._behaviours[key]
            else:
                behaviour = classify_elementwise(module, first)
                if key is not None:
                    self._behaviours[key] = behaviour
            if behaviour is not None:
                return (f"activation:{behaviour[0]}", behaviour[1])
        return None

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if self.testing:
            return
        if self.depth == 0:
            entered = False
            if self.problem is None:
                role = self._roles.get(id(module), _UNDECIDED)
                if role is _UNDECIDED:
                    try:
                        role = self._role(module, args if isinstance(args, tuple) else (args,))
                    except Exception as error:
                        self.problem = f"classifying module {type(module).__name__} failed: {error!r}"
                        role = None
                entered = role is not None
            if entered and self._opaque_builtin(module):
                # nothing inside is recorded, and torch's own module writes no input in place: its calls skip the
                # function mode (an inplace=True activation or a module of other code keeps it, for its writes)
                disabler = torch._C.DisableTorchFunction()
                disabler.__enter__()
                self._disablers.append(disabler)
                self._entered.append(2)
                self.depth += 1
                return
        else:
            entered = True
        self._entered.append(1 if entered else 0)
        if entered:
            self.depth += 1

    def _opaque_builtin(self, module: nn.Module) -> bool:
        """Whether a module recorded as one node is torch's own and does not write its input in place (decided
        once per class and flag)."""
        if getattr(module, "inplace", False) is True:
            return False
        cls = type(module)
        builtin = self._builtin.get(cls)
        if builtin is None:
            builtin = self._builtin[cls] = cls.__module__.startswith("torch.nn.")
        return builtin

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.testing:
            return
        entered = self._entered.pop() if self._entered else 0
        if not entered:
            return
        if entered == 2 and self._disablers:
            self._disablers.pop().__exit__(None, None, None)
        self.depth -= 1
        if self.depth != 0 or self.problem is not None:
            return
        try:
            with torch._C.DisableTorchFunction():  # its own tensor reads (shapes) are not the model's ops
                self._record_module(module, args, output)
        except Exception as error:
            self.problem = f"recording module {type(module).__name__} failed: {error!r}"

    def _plan(self, module: nn.Module) -> tuple[str, str, str, str | None, float]:
        """How every call of a recorded module becomes a node, decided at its first call: ``(name, node kind, op,
        layer kind, slope or gain)``. The per-call work is then a lookup: a model's forward calls hundreds of
        modules, and each Python step per call adds to the probe's cost."""
        name = self.module_names.get(id(module), type(module).__name__)
        role, slope = self._roles[id(module)] or ("layer", 0.0)
        self.recorded_modules[name] = module
        plan: tuple[str, str, str, str | None, float]
        if role.startswith("activation"):
            op = role.split(":", 1)[1] if ":" in role else activation_module_name(module) or "relu"
            plan = (name, "activation", op, None, slope)
        elif role == "norm":
            plan = (name, "norm", type(module).__name__, None, slope)
            if not isinstance(module, NORM_TYPES):
                self.norm_gains.setdefault(name, slope)  # measured by behaviour at the first call
        elif role == "scale":
            plan = (name, "pass", "scale", None, slope)  # the gain measured at the first call
        else:
            plan = (name, "layer", type(module).__name__, layer_kind(module) or "other", slope)
        self._plans[id(module)] = plan
        return plan

    def _record_module(self, module: nn.Module, args: Any, output: Any) -> None:
        name, kind, op, layer, slope = self._plans.get(id(module)) or self._plan(module)
        inputs = self._traced_inputs(args)
        signal = self.signal
        if kind == "layer":
            assert layer is not None  # _plan gives every "layer" plan a layer kind ("other" at least)
            node = self._new_node("layer", name, op, inputs, signal=self._layer_signal(layer, inputs))
            node.layer_kind = layer
            node.adds_depth = name not in self._called or layer != "recurrent"
            self._called.add(name)
        else:
            node = self._new_node(kind, name, op, [i for i in inputs if signal[i]])
            if kind == "activation":
                node.negative_slope = slope
            elif kind == "pass":
                node.scale = slope
        first_input = (
            args[0]
            if args and isinstance(args[0], Tensor)
            else next((t for t in pytree_leaves(args) if isinstance(t, Tensor)), None)
        )
        node.input_shape = tuple(first_input.shape) if first_input is not None else ()
        self._register_outputs(node, output, disabled=True)

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
        tensors = [t for t in pytree_leaves(output) if isinstance(t, Tensor)]
        for position, tensor in enumerate(tensors):
            suffix = (
                f"[{index}]"
                if isinstance(index, int)
                else (f"[{position}]" if op in ("unbind", "chunk", "split") else "")
            )
            self.derived[id(tensor)] = name + suffix
            self._alive.append(tensor)

    def record_function(self, func: Callable, args: tuple, kwargs: dict, output: Any) -> None:
        """Record one functional call seen outside the recorded modules."""
        if not isinstance(output, Tensor) and not any(isinstance(leaf, Tensor) for leaf in pytree_leaves(output)):
            return  # shapes, sizes, flags: read first, since most calls the model makes return no tensor
        leaves = [leaf for leaf in pytree_leaves(args) if isinstance(leaf, Tensor)]
        if kwargs:
            leaves += [leaf for leaf in pytree_leaves(kwargs) if isinstance(leaf, Tensor)]
        op = op_name(func)
        # one pass over the tensor arguments: parameters used, weights (or slices of one) applied, traced inputs
        owners, producers = self.parameter_owner, self.producers
        weights: list[tuple[Tensor, str]] = []
        traced: list[int] = []
        first: Tensor | None = None  # the first argument a node produced
        for leaf in leaves:
            key = id(leaf)
            if key in owners:
                self.used_parameters.add(key)
            name = self._weight_name(leaf)
            if name is not None:
                weights.append((leaf, name))
            producer = producers.get(key)
            if producer is not None:
                if first is None:
                    first = leaf
                if producer not in traced:
                    traced.append(producer)
        if weights and not traced:
            # the weights taken apart or combined before use (W[i], W.T, torch.stack): still weights
            self._derive_weights(op, args, [name for _, name in weights], output)
            return
        if weights and op in FUNCTIONAL_LAYERS:
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
        elif op in JOINS and len(inputs) >= 2:
            node = self._new_node("join", op, op, inputs)
        elif op in PASS_THROUGH or (op in JOINS | SCALINGS | DIFFERENCES and len(inputs) == 1):
            node = self._new_node("pass", op, op, inputs)
            if op in SCALINGS:
                node.scale = constant_factor(op, args, self.producers, self._is_weight)
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
        if node.kind in ("pass", "op") and first is not None and isinstance(output, Tensor):
            node.global_reduction = pools_positions(first, output)
        self._register_outputs(node, output)

    def _is_weight(self, tensor: Tensor) -> bool:
        return self._weight_name(tensor) is not None

    def _record_functional_layer(
        self,
        op: str,
        args: tuple,
        weights: list[tuple[Tensor, str]],
        traced: list[int],
        leaves: list[Tensor],
        output: Any,
    ) -> None:
        """One application of a weight by a functional op: a layer node named after the weight, with the
        fan-in/fan-out read from the op (``x @ W`` contracts ``W``'s first axis, ``F.linear`` its last)."""
        weight, name = next(((w, n) for w, n in weights if w.dim() >= 2), weights[0])  # addmm's bias comes first
        kind = FUNCTIONAL_LAYERS[op]
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
        node.fans = op_fans(op, args, weight)
        self._called.add(name)
        self._register_outputs(node, output)

    def _gate_split(self, leaves: list[Tensor], inputs: list[int], output: Any) -> tuple[list[int], list[int]] | None:
        """Split a product of traced tensors into the main path and gates: a gate is broadcast against the
        output (Squeeze-Excitation's per-channel scale) or comes from a sigmoid-family activation."""
        if not isinstance(output, Tensor):
            return None
        shape_of = {self.producers[id(t)]: tuple(t.shape) for t in leaves if id(t) in self.producers}
        main: list[int] = []
        gates: list[int] = []
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
        for leaf in pytree_leaves(values):
            if isinstance(leaf, Tensor) and id(leaf) in self.producers:
                producer = self.producers[id(leaf)]
                if producer not in inputs:
                    inputs.append(producer)
        return inputs

    def _new_node(self, kind: str, name: str, op: str, inputs: list[int], signal: bool | None = None) -> Node:
        node = Node(len(self.nodes), kind, name, op, inputs)
        self.nodes.append(node)
        if signal is None:
            flags = self.signal
            signal = False
            for i in inputs:  # a loop, not any(<generator>): one call per node of the model
                if flags[i]:
                    signal = True
                    break
        self.signal.append(signal)
        node.signal = signal
        return node

    def _register_outputs(self, node: Node, output: Any, disabled: bool = False) -> None:
        """Map the node's output tensors to it and hand the first to the probe (``disabled``: the caller has
        already turned the function mode off)."""
        if isinstance(output, Tensor):
            tensors = [output]
        else:
            tensors = [t for t in pytree_leaves(output) if isinstance(t, Tensor)]
        if not tensors:
            return
        producers = self.producers
        for tensor in tensors:
            producers[id(tensor)] = node.index
        self._alive.extend(tensors)
        node.output = tensors[0]
        if node.kind in ("layer", "join"):
            callback = self.on_layer_output
        elif node.kind == "activation":
            callback = self.on_activation
        else:
            return
        if callback is None:
            return
        self.testing = True  # the probe's reads are not part of the model's graph
        try:
            if disabled:
                callback(node, tensors[0])
            else:
                with torch._C.DisableTorchFunction():  # nor dispatched through the recorder
                    callback(node, tensors[0])
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
            name: cast(Tensor, module.weight)  # a Tensor: the condition below checks it
            for name, module in self.recorded_modules.items()
            if isinstance(module, NORM_TYPES) and isinstance(getattr(module, "weight", None), Tensor)
        }
        gains = {name: 1.0 for name, m in self.recorded_modules.items() if isinstance(m, NORM_TYPES)}
        if weighted:
            rms = torch.stack([w.detach().float().square().mean().sqrt().cpu() for w in weighted.values()])
            gains.update(zip(weighted, rms.tolist(), strict=True))  # one host sync
        return gains

    def _resolve_weights(self) -> dict[str, tuple[nn.Module | None, Tensor | None]]:
        resolved: dict[str, tuple[nn.Module | None, Tensor | None]] = {}
        modules = dict(self.modules)
        parameters = dict(self.parameters)
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


def _behaviour_key(module: nn.Module, like: Tensor) -> tuple | None:
    """What decides the behaviour of a parameter- and buffer-free leaf on the classification grid: its class,
    its plain attributes (``approximate="tanh"``, a function it applies) and the grid's dtype and device. Two
    instances with equal keys compute the same function there (every layer of a Transformer has its own GELU
    module), so one classification serves them all. None when an attribute cannot be compared (a tensor, a
    container): that module is classified on its own."""
    attributes = []
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training":
            continue
        # collections.abc.Callable is a valid isinstance target at runtime; mypy sees only its special form
        if isinstance(value, Tensor) or not isinstance(value, (int, float, str, bool, type(None), Callable)):  # type: ignore[arg-type]
            return None
        if isinstance(value, nn.Module):
            return None
        attributes.append((name, value))
    try:
        key = (type(module), tuple(attributes), like.dtype, like.device.type)
        hash(key)
    except TypeError:
        return None
    return key


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
