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

This module holds the tracer, which ties the parts together: the shared :mod:`.recording`, the module hooks
(:mod:`.module_calls`, with the roles of :mod:`.module_roles`), the function mode (:mod:`.function_calls`) and the
weights it follows (:mod:`.weight_names`); :func:`trace` runs one forward under it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from lightning_gradstab.diagnosis.function_calls import FunctionCallMode, FunctionCalls
from lightning_gradstab.diagnosis.graph import ModelGraph, build_graph
from lightning_gradstab.diagnosis.module_calls import ModuleCalls
from lightning_gradstab.diagnosis.nodes import Node
from lightning_gradstab.diagnosis.recording import Recording
from lightning_gradstab.diagnosis.weight_names import WeightNames, resolve_weights


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
        self.on_mutation = on_mutation
        # the model is walked once: named_modules/named_parameters recurse through generators on every call
        self.modules: list[tuple[str, nn.Module]] = list(model.named_modules())
        self.parameters: list[tuple[str, nn.Parameter]] = list(model.named_parameters())
        self.recording = Recording(on_layer_output, on_activation)
        self.weights = WeightNames(self.parameters)
        self.module_calls = ModuleCalls(model, self.modules, self.recording)
        self.function_calls = FunctionCalls(self.recording, self.weights)

    @property
    def nodes(self) -> list[Node]:
        """The nodes recorded so far, in execution order."""
        return self.recording.nodes

    def register_inputs(self, inputs: Any) -> None:
        """Mark the tensors the forward starts from as graph inputs."""
        self.recording.register_inputs(inputs)

    @contextmanager
    def tracing(self) -> Iterator[GraphTracer]:
        """Install hooks and the function mode for the duration of the block."""
        self.module_calls.install()
        try:
            if self.recording.problem is None:
                with FunctionCallMode(self.function_calls, self.on_mutation):
                    yield self
            else:
                yield self
        finally:
            self.module_calls.close()
            self.recording.depth = 0

    def build(self, output: Any) -> ModelGraph:
        """Summarise the recorded nodes into a :class:`ModelGraph` (call after the forward)."""
        recording = self.recording
        output_nodes = set(recording.traced_inputs(output))
        weights = resolve_weights(recording.nodes, self.modules, self.parameters)
        graph = build_graph(recording.nodes, output_nodes, weights)
        graph.untraced = self.weights.untraced_parameters(self.model, self.module_calls.recorded_modules)
        graph.norm_gains = self.module_calls.norm_gains()
        if recording.problem:
            graph.problems.append(recording.problem)
        applied = {layer.name for layer in graph.layers}
        missed = {name: op for name, op in self.function_calls.missed.items() if name not in applied}
        graph.missed = missed
        if missed:
            graph.problems.append(
                "weights applied to the signal by ops not read as layers (their depth and scale are not judged): "
                + ", ".join(f"{name} ({op})" for name, op in missed.items())
            )
        self.weights.release_tensors()
        recording.release_tensors()
        return graph


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
