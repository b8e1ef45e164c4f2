"""Recording the functional calls ``forward`` makes between the modules recorded whole (``F.relu``,
``x.sigmoid()``, ``x + block(x)``, ``x @ W[i].T``), through a ``TorchFunctionMode``.

Each call that returns a tensor is read once: a call on weights alone derives weights (``W[i]``, ``W.T``); a
call that applies a weight to the signal is a layer, named after the weight, with the fan-in/fan-out read from
the op; any other call on the signal is an activation, a normalization, a join, a pass-through (reshapes,
dropout, pooling, scaling by a constant), a gated product (its gate off the main path: Squeeze-Excitation) or a
plain op. Calls on constants only (masks, positions) are no node. Before any call that may write a tensor in
place, the probe is told, so the statistics it defers are read before the values change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_gradstab.diagnosis.in_place import writes_in_place, written_tensors
from lightning_gradstab.diagnosis.nodes import Node
from lightning_gradstab.diagnosis.ops import (
    ACTIVATION_FAMILY,
    DIFFERENCES,
    FUNCTIONAL_LAYERS,
    JOINS,
    NORM_FUNCTIONS,
    PASS_THROUGH,
    SCALINGS,
    activation_family,
    constant_factor,
    op_fans,
    op_name,
    pools_positions,
    pytree_leaves,
)
from lightning_gradstab.diagnosis.recording import Recording
from lightning_gradstab.diagnosis.weight_names import WeightNames

_NO_TENSOR = frozenset({int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device})
"""Types of call results that hold no tensor (``x.shape``, ``x.size(0)``, ``x.dtype``, ``x.is_floating_point()``)."""


class FunctionCallMode(TorchFunctionMode):
    """Hands every torch call the forward makes outside a module recorded whole (and outside the probe's own
    calls) to :meth:`FunctionCalls.record`; ``on_mutation(tensors)`` is called before any call that may write a
    tensor in place (with the tensors it may write, None when any argument may be)."""

    def __init__(self, calls: FunctionCalls, on_mutation: Callable[[list[Any] | None], None] | None) -> None:
        super().__init__()
        self.calls = calls
        self.recording = calls.recording
        self.on_mutation = on_mutation

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        recording = self.recording
        if self.on_mutation is not None and writes_in_place(func, args, kwargs):
            # the outputs recorded so far are read before this call can overwrite them
            self.on_mutation(written_tensors(func, args, kwargs))
        output = func(*args, **kwargs)
        # shapes, sizes, dtypes, flags: most calls a model makes return no tensor, and are no node
        if (
            type(output) not in _NO_TENSOR
            and recording.depth == 0
            and recording.problem is None
            and not recording.testing
        ):
            try:
                self.calls.record(func, args, kwargs, output)
            except Exception as error:  # tracing must never break the user's forward
                recording.problem = f"recording {op_name(func)} failed: {error!r}"
        return output


class FunctionCalls:
    """Turns functional calls into nodes of the recording (see the module); ``missed``: the weights applied to
    the signal by an op not read as a layer, with that op."""

    def __init__(self, recording: Recording, weights: WeightNames) -> None:
        self.recording = recording
        self.weights = weights
        self.missed: dict[str, str] = {}  # weight -> the op that applied it to the signal unrecognised

    def record(self, func: Callable, args: tuple, kwargs: dict, output: Any) -> None:
        """Record one functional call seen outside the recorded modules."""
        if not isinstance(output, Tensor) and not any(isinstance(leaf, Tensor) for leaf in pytree_leaves(output)):
            return  # shapes, sizes, flags: read first, since most calls the model makes return no tensor
        leaves = [leaf for leaf in pytree_leaves(args) if isinstance(leaf, Tensor)]
        if kwargs:
            leaves += [leaf for leaf in pytree_leaves(kwargs) if isinstance(leaf, Tensor)]
        op = op_name(func)
        weights, traced, first = self._read_arguments(leaves)
        if weights and not traced:
            # the weights taken apart or combined before use (W[i], W.T, torch.stack): still weights
            self.weights.derive(op, args, [name for _, name in weights], output)
            return
        if weights and op in FUNCTIONAL_LAYERS:
            self._record_layer(op, args, weights, traced, leaves, output)
            return
        inputs = self.recording.signal_only(traced)
        if not inputs:
            return  # a constant computation (masks, positions): not part of the signal path
        node = self._signal_node(op, args, kwargs, inputs, leaves, weights, output)
        if node.kind in ("pass", "op") and first is not None and isinstance(output, Tensor):
            # an attention pooling (a learned query over the sequence) pools the positions as a mean does
            node.global_reduction = node.pooling_attention or pools_positions(first, output)
        self.recording.register_outputs(node, output)

    def _read_arguments(self, leaves: list[Tensor]) -> tuple[list[tuple[Tensor, str]], list[int], Tensor | None]:
        """One pass over the tensor arguments: the parameters used (noted), the weights (or slices of one) among
        them with their names, the nodes that produced the traced ones, and the first traced argument."""
        owners, producers = self.weights.parameter_owner, self.recording.producers
        used, weight_name = self.weights.used_parameters, self.weights.weight_name
        weights: list[tuple[Tensor, str]] = []
        traced: list[int] = []
        first: Tensor | None = None  # the first argument a node produced
        for leaf in leaves:
            key = id(leaf)
            if key in owners:
                used.add(key)
            name = weight_name(leaf)
            if name is not None:
                weights.append((leaf, name))
            producer = producers.get(key)
            if producer is not None:
                if first is None:
                    first = leaf
                if producer not in traced:
                    traced.append(producer)
        return weights, traced, first

    def _signal_node(
        self,
        op: str,
        args: tuple,
        kwargs: dict,
        inputs: list[int],
        leaves: list[Tensor],
        weights: list[tuple[Tensor, str]],
        output: Any,
    ) -> Node:
        """The node of a call on the signal that applies no weight as a layer (``inputs``: its traced signal
        inputs): an activation, a normalization, a gated product, a join, a pass-through, or a plain op."""
        new_node = self.recording.new_node
        if op in ACTIVATION_FAMILY:
            node = new_node("activation", f"F.{op}", op, inputs)
            slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
            node.negative_slope = float(slope) if op == "leaky_relu" and isinstance(slope, (int, float)) else 0.0
        elif op in NORM_FUNCTIONS:
            node = new_node("norm", f"F.{op}", op, inputs)
        elif op == "mul" and len(inputs) >= 2 and (gated := self._gate_split(leaves, inputs, output)):
            main, gates = gated
            node = new_node("pass", op, op, main)
            node.side_inputs = gates
        elif op in JOINS and len(inputs) >= 2:
            node = new_node("join", op, op, inputs)
        elif op in PASS_THROUGH or (op in JOINS | SCALINGS | DIFFERENCES and len(inputs) == 1):
            node = new_node("pass", op, op, inputs)
            if op in SCALINGS:
                node.scale = constant_factor(op, args, self.recording.producers, self.weights.is_weight)
        elif op == "addcmul" and len(inputs) == 1:  # beta + alpha * x (ResMLP's Affine written inline)
            node = new_node("pass", op, op, inputs)
            factors = [a for a in args[1:3] if isinstance(a, Tensor) and id(a) not in self.recording.producers]
            node.scale = float(factors[0].detach().double().square().mean().sqrt()) if factors else 1.0
        else:
            node = self._op_node(op, args, kwargs, inputs, leaves, weights)
        return node

    def _op_node(
        self,
        op: str,
        args: tuple,
        kwargs: dict,
        inputs: list[int],
        leaves: list[Tensor],
        weights: list[tuple[Tensor, str]],
    ) -> Node:
        """A plain op on the signal: the value of a fused attention call and the attention probabilities of a
        product are noted (depth is counted along the values), and a weight it applies is a missed layer."""
        node = self.recording.new_node("op", op, op, inputs)
        if op == "scaled_dot_product_attention":
            value = kwargs.get("value", args[2] if len(args) > 2 else None)
            node.value_inputs = self.recording.traced_inputs([value]) if isinstance(value, Tensor) else []
            # a pooling: a query not computed from the signal, over fewer positions than the keys it reads (a
            # self-attention whose query the tracer lost track of keeps every position and is no pooling)
            query = kwargs.get("query", args[0] if args else None)
            key = kwargs.get("key", args[1] if len(args) > 1 else None)
            signal = self.recording.signal
            node.pooling_attention = (
                isinstance(query, Tensor) and isinstance(key, Tensor) and query.dim() >= 2 and key.dim() >= 2
                and query.shape[-2] < key.shape[-2]
                and not any(signal[i] for i in self.recording.traced_inputs([query]))
            )
        elif op in ("matmul", "bmm", "einsum") and len(inputs) >= 2:
            node.mixing_inputs = [i for i in inputs if self._from_softmax(i)]
        applied = args[:3] if op == "scaled_dot_product_attention" else leaves  # its mask is an additive bias
        for leaf, name in weights:
            if sum(size > 1 for size in leaf.shape) >= 2 and any(leaf is a for a in applied):
                self.missed.setdefault(name, op)  # a weight applied by an op we do not read as a layer
        return node

    def _record_layer(
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
        recording = self.recording
        weight, name = _applied_weight(op, args, weights)
        kind = FUNCTIONAL_LAYERS[op]
        if kind == "attention":  # one attention layer over its projections: named after their common owner
            owners = [n.split(".") for _, n in weights]
            common = [parts[0] for parts in zip(*owners, strict=False) if len(set(parts)) == 1]
            name = ".".join(common) or name
        self.weights.used_parameters.update(id(p) for p, _ in weights)
        node = recording.new_node("layer", name, op, traced, signal=recording.layer_signal(kind, traced))
        node.layer_kind = kind
        signal_leaf = next((leaf for leaf in leaves if id(leaf) in recording.producers), leaves[0])
        node.input_shape = tuple(signal_leaf.shape)
        node.adds_depth = name not in recording.applied or kind != "recurrent"
        node.weight = weight
        node.fans = op_fans(op, args, weight)
        recording.applied.add(name)
        recording.register_outputs(node, output)

    def _gate_split(self, leaves: list[Tensor], inputs: list[int], output: Any) -> tuple[list[int], list[int]] | None:
        """Split a product of traced tensors into the main path and gates: a gate is broadcast against the
        output (Squeeze-Excitation's per-channel scale) or comes from a sigmoid-family activation."""
        if not isinstance(output, Tensor):
            return None
        producers = self.recording.producers
        shape_of = {producers[id(t)]: tuple(t.shape) for t in leaves if id(t) in producers}
        main: list[int] = []
        gates: list[int] = []
        for producer in inputs:
            full = shape_of.get(producer) == tuple(output.shape)
            (main if full and not self._is_gate(producer) else gates).append(producer)
        return (main, gates) if main and gates else None

    def _source(self, index: int) -> Node:
        """The node a pass-through chain ending at node ``index`` starts from."""
        nodes = self.recording.nodes
        node = nodes[index]
        while node.kind == "pass" and node.inputs:
            node = nodes[node.inputs[0]]
        return node

    def _from_softmax(self, index: int) -> bool:
        node = self._source(index)
        return node.kind == "activation" and node.op in ("softmax", "log_softmax", "softmin")

    def _is_gate(self, index: int) -> bool:
        node = self._source(index)
        return node.kind == "activation" and activation_family(node.op) == "sigmoid"


_ADDED_FIRST = frozenset({"addmm", "baddbmm", "addbmm", "addmv", "addr"})
"""Ops whose first argument is added to the product of the others (``torch.addmm(bias, x, W)``)."""


def _applied_weight(op: str, args: tuple, weights: list[tuple[Tensor, str]]) -> tuple[Tensor, str]:
    """The weight a functional layer applies: a matrix among the product's operands, never the term ``addmm``
    and its kin add first, however many dimensions that term has (``baddbmm(bias[:, None, :], x, W)``)."""
    operands = args[1:] if op in _ADDED_FIRST else args
    matrices = [(w, n) for w, n in weights if w.dim() >= 2]
    applied = [(w, n) for w, n in matrices if any(w is a for a in operands)]
    return (applied or matrices or weights)[0]
