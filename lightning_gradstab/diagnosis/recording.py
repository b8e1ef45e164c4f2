"""What one trace writes, shared by the module hooks and the function mode that record it.

The nodes in execution order, the node that produced each traced tensor (matched by identity, so the tensors are
kept alive until the graph is built and no id is reused), which nodes carry the input signal, and the flags both
recorders read before recording anything: the nesting depth inside a module recorded as one node, whether the
probe's own calls are running, and the first problem met (after which nothing more is recorded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from lightning_gradstab.diagnosis.nodes import Node
from lightning_gradstab.diagnosis.ops import pytree_leaves


class Recording:
    """The nodes of one trace and the tensors they produced (see the module).

    ``on_layer_output(node, tensor)`` and ``on_activation(node, tensor)`` let the probe remember the very
    tensors the graph sees; they run with :attr:`testing` set and the function mode off.
    """

    def __init__(
        self,
        on_layer_output: Callable[[Node, Tensor], None] | None = None,
        on_activation: Callable[[Node, Tensor], None] | None = None,
    ) -> None:
        self.on_layer_output = on_layer_output
        self.on_activation = on_activation
        self.nodes: list[Node] = []
        self.producers: dict[int, int] = {}  # id of a traced tensor -> the index of the node that produced it
        self._alive: list[Tensor] = []  # keeps traced tensors alive so ids are never reused
        self.signal: list[bool] = []  # per node: carries the input signal (not a mask built from integer ids)
        self.depth = 0  # > 0 inside a module recorded as one node: its internals are not recorded
        self.testing = False  # True while a module is evaluated on probe inputs (nothing is recorded)
        self.problem: str | None = None
        # the layers applied so far: a recurrent cell's later calls are time steps, not depth
        self.applied: set[str] = set()

    def register_inputs(self, inputs: Any) -> None:
        """Mark the tensors the forward starts from as graph inputs."""
        for tensor in tree_leaves(inputs):
            if isinstance(tensor, Tensor):
                node = self.new_node("input", "input", "input", [], signal=tensor.is_floating_point())
                self.register_outputs(node, tensor)

    def signal_only(self, inputs: list[int]) -> list[int]:
        return [i for i in inputs if self.signal[i]]

    def layer_signal(self, kind: str, inputs: list[int]) -> bool:
        """A layer carries the signal when one of its inputs does; an embedding starts it from integer ids. A
        layer over constants only (a position-bias MLP over a coordinate table) computes a constant at init."""
        return kind == "embedding" or any(self.signal[i] for i in inputs)

    def traced_inputs(self, values: Any) -> list[int]:
        """The nodes that produced the traced tensors among ``values`` (each once, in order)."""
        inputs: list[int] = []
        for leaf in pytree_leaves(values):
            if isinstance(leaf, Tensor) and id(leaf) in self.producers:
                producer = self.producers[id(leaf)]
                if producer not in inputs:
                    inputs.append(producer)
        return inputs

    def new_node(self, kind: str, name: str, op: str, inputs: list[int], signal: bool | None = None) -> Node:
        """Append a node (it carries the signal when ``signal`` says so, else when one of its inputs does)."""
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

    def register_outputs(self, node: Node, output: Any, disabled: bool = False) -> None:
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

    def release_tensors(self) -> None:
        """Forget which node produced each tensor and let the tensors go (once the graph is built)."""
        self._alive.clear()
        self.producers.clear()
