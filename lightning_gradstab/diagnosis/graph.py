"""The model's dataflow graph: the recorded nodes summarised per parameterised layer.

The nodes come from :mod:`lightning_gradstab.diagnosis.tracer`, recorded in execution order during one real
forward. From them we derive, for each parameterised layer, the activation that consumes its output, whether a
normalization follows, whether it ends or lies in a residual branch, whether it is an output layer (a softcap,
an average of heads or a loss computed in ``forward`` may follow it), and the longest *plain* chain: the most
weight applications a signal must cross with no skip connection offering a shorter path. The path questions
themselves are :mod:`.paths`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from lightning_gradstab.diagnosis.nodes import Node
from lightning_gradstab.diagnosis.paths import (
    demote_arithmetic_joins,
    feeds_a_layer_directly,
    has_norm_upstream,
    in_branch_all,
    longest_plain_chain,
    node_consumers,
    only_reaches,
    plain_chain_depths,
    pre_norm_stream,
    reaches_a_layer,
    reaches_all,
)


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
        activation_feeds_layer: its activation's output is the input of another layer through reshapes, dropout
            and normalizations only (a hidden activation), not only a gate, a router score or an index.
        gate: its output only reaches the main path through a multiplicative gate (Squeeze-Excitation).
        attention_logits: its output only reaches attention logits (query/key projections), whose gradient
            is small at init by construction: the softmax is near-uniform.
        pooling_head: its output only reaches the key or value of an attention pooling (a learned query attending
            over the positions): each position gets about 1/positions of the pooled output's gradient, as before
            a global average pool, so it is part of a head, no point of the signal's path.
        in_branch: it lies inside a residual branch (its output joins a skip connection as the branch).
        pre_norm_stream: an embedding whose output enters a residual stream un-normalized while the branches
            read it through a normalization (pre-LN Transformers).
        stream_start: for such an embedding, the node that enters the first skip connection as the stream (its
            output, or its sum with positions or patches), whose measured scale is the stream's.
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
    activation_feeds_layer: bool = False
    gate: bool = False
    attention_logits: bool = False
    pooling_head: bool = False
    in_branch: bool = False
    stream_start: int | None = None
    downstream_scale: float = 1.0
    calls: int = 0
    input_shape: tuple[int, ...] = ()
    fans: tuple[int, int] | None = None
    on_signal_path: bool = True

    @property
    def pre_norm_stream(self) -> bool:
        """Whether this embedding starts a pre-LN residual stream (see ``stream_start``)."""
        return self.stream_start is not None


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
    # computed once by build_graph (the rules ask for it several times; the nodes do not change afterwards)
    _chain_parent: list[int | None] | None = field(default=None, repr=False, compare=False)
    _consumers: list[list[int]] | None = field(default=None, repr=False, compare=False)

    @property
    def plain_depth(self) -> int:
        """Number of weight applications on the longest plain chain (at least its distinct layers)."""
        return max(self.plain_applications, len(self.plain_chain))

    def layer(self, name: str) -> LayerInfo | None:
        """The layer summary for module ``name`` (None if it was not traced)."""
        return next((layer for layer in self.layers if layer.name == name), None)

    def chain_parent(self) -> list[int | None]:
        """For every node, the input along which its plain-chain depth was reached (None for sources)."""
        if self._chain_parent is None or len(self._chain_parent) != len(self.nodes):
            self._chain_parent = plain_chain_depths(self.nodes)[1]
        return self._chain_parent

    def consumers(self) -> list[list[int]]:
        """For every node, the nodes that read its output (main and side inputs); computed once per graph (the
        probe and the rules ask for it; the nodes' inputs do not change after the build). Do not modify it."""
        if self._consumers is None or len(self._consumers) != len(self.nodes):
            self._consumers = node_consumers(self.nodes)
        return self._consumers


def build_graph(
    nodes: list[Node],
    output_nodes: set[int],
    weights: dict[str, tuple[nn.Module | None, Tensor | None]],
) -> ModelGraph:
    """Derive per-layer summaries, skip connections and the longest plain chain from recorded nodes."""
    depth, parent = demote_arithmetic_joins(nodes)  # the plain-chain DP with the final joins
    consumers = node_consumers(nodes)
    gated = {i for node in nodes for i in node.side_inputs}
    # the path questions below walk to the output from every layer: asked only where their answer can be yes
    attends = any(n.op in ("softmax", "log_softmax", "scaled_dot_product_attention") for n in nodes)
    pools = any(n.pooling_attention for n in nodes)
    joins = any(n.kind == "join" for n in nodes)
    in_branch = in_branch_all(nodes, consumers, parent, output_nodes) if joins else []
    has_norm: list[bool] | None = None  # a normalization upstream of each node (asked for embeddings only)
    layers: dict[str, LayerInfo] = {}
    direct_output, reaches_layer = reaches_all(nodes, consumers, output_nodes)
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
            _describe_consumers(info, node, nodes, consumers, output_nodes, reaches_layer)
            info.is_output |= direct_output[node.index]
            info.gate = bool(gated) and only_reaches(node.index, nodes, consumers, gated, "gate", output_nodes)
            info.attention_logits = (
                attends
                and not info.is_output
                and only_reaches(node.index, nodes, consumers, gated, "logits", output_nodes)
            )
            info.pooling_head = (
                pools
                and not info.is_output
                and only_reaches(node.index, nodes, consumers, gated, "pooling", output_nodes)
            )
            info.in_branch = joins and in_branch[node.index]
            if info.kind == "embedding":
                has_norm = has_norm_upstream(nodes) if has_norm is None else has_norm
                info.stream_start = pre_norm_stream(node.index, nodes, consumers, has_norm)
    for node in nodes:
        if node.kind == "join":
            node.in_branch = in_branch[node.index]
    chain, normalized, activations, applications = longest_plain_chain(nodes, depth, parent)
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
        _chain_parent=parent,
        _consumers=consumers,
    )


def _describe_consumers(
    info: LayerInfo,
    node: Node,
    nodes: list[Node],
    consumers: list[list[int]],
    output_nodes: set[int],
    reaches_layer: list[bool] | None = None,
) -> None:
    """Walk from a layer's output through pass-through ops to what really consumes it (``reaches_layer``: the
    answers of :func:`reaches_a_layer` for every node, when already swept)."""
    if reaches_layer is None:
        reaches_layer = [reaches_a_layer(i, nodes, consumers) for i in range(len(nodes))]
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
                    info.feeds_layer |= reaches_layer[consumer_index]
            elif consumer.kind == "norm" and not past_norm and info.activation is None:
                info.normalized = True
                frontier.append((consumer_index, True))
            elif consumer.kind == "activation" and info.activation is None:
                info.activation = consumer.op
                info.negative_slope = consumer.negative_slope
                info.feeds_layer |= reaches_layer[consumer_index]
                info.activation_feeds_layer = reaches_layer[consumer_index] and feeds_a_layer_directly(
                    consumer_index, nodes, consumers
                )
            elif consumer.kind == "join" and not past_norm:
                info.feeds_join = True
            elif consumer.kind == "layer":
                info.feeds_layer = True
            elif consumer.kind in ("op", "norm", "activation", "join"):
                info.feeds_layer |= reaches_layer[consumer_index]
