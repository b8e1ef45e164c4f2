"""The model's dataflow graph and the questions asked of it (path analysis).

The nodes come from :mod:`lightning_gradstab.diagnosis.tracer`, recorded in execution order during one real
forward. From them we derive, for each parameterised layer, the activation that consumes its output, whether a
normalization follows, whether it ends or lies in a residual branch, whether it is an output layer (a softcap,
an average of heads or a loss computed in ``forward`` may follow it), and the longest *plain* chain: the most
weight applications a signal must cross with no skip connection offering a shorter path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from lightning_gradstab.diagnosis.ops import JOINS


@dataclass(slots=True)
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
            self._chain_parent = _plain_chain_dp(self.nodes)[1]
        return self._chain_parent

    def consumers(self) -> list[list[int]]:
        """For every node, the nodes that read its output (main and side inputs); computed once per graph (the
        probe and the rules ask for it; the nodes' inputs do not change after the build). Do not modify it."""
        if self._consumers is None or len(self._consumers) != len(self.nodes):
            self._consumers = _consumers(self.nodes)
        return self._consumers


def _consumers(nodes: list[Node]) -> list[list[int]]:
    consumers: list[list[int]] = [[] for _ in nodes]
    for node in nodes:
        for i in dict.fromkeys(node.inputs + node.side_inputs):
            consumers[i].append(node.index)
    return consumers


def _plain_chain_dp(
    nodes: list[Node], start: int = 0, known: tuple[list[int], list[int | None]] | None = None
) -> tuple[list[int], list[int | None]]:
    """Plain-chain depth of every node: distinct layers crossed on the shortest-cut path from the inputs.

    A join takes the *smallest* depth of its inputs (the skip offers that shorter path); every other node
    the largest of its main inputs (a gate's branch is off the main path). Embeddings are lookups, and a
    module called again (an RNN cell per time step, a layer shared across depth) is the same layer: neither
    adds depth.

    ``known``: the depths and parents of an earlier pass, kept for the nodes before ``start`` (a node's entry
    depends only on the nodes before it, which come first in execution order) and recomputed from there.
    """
    depth: list[int] = known[0][:start] if known is not None else []
    parent: list[int | None] = known[1][:start] if known is not None else []
    for node in nodes[len(depth) :]:
        inputs = node.inputs
        if inputs:
            main = (
                node.value_inputs
                or ([i for i in inputs if i not in node.mixing_inputs] if node.mixing_inputs else inputs)
                or inputs
            )
            best = main[0]
            base = depth[best]
            if node.kind == "join":  # min over the inputs, the first of equal ones (as min(key=...) picks it)
                for i in main:
                    if depth[i] < base:
                        best, base = i, depth[i]
            else:
                for i in main:
                    if depth[i] > base:
                        best, base = i, depth[i]
        else:
            best, base = None, 0
        adds = node.kind == "layer" and node.layer_kind != "embedding" and node.adds_depth and node.signal
        depth.append(base + 1 if adds else base)
        parent.append(best)
    return depth, parent


def build_graph(
    nodes: list[Node],
    output_nodes: set[int],
    weights: dict[str, tuple[nn.Module | None, Tensor | None]],
) -> ModelGraph:
    """Derive per-layer summaries, skip connections and the longest plain chain from recorded nodes."""
    depth, parent = _demote_arithmetic_joins(nodes)  # the plain-chain DP with the final joins
    consumers = _consumers(nodes)
    gated = {i for node in nodes for i in node.side_inputs}
    # the path questions below walk to the output from every layer: asked only where their answer can be yes
    attends = any(n.op in ("softmax", "log_softmax", "scaled_dot_product_attention") for n in nodes)
    joins = any(n.kind == "join" for n in nodes)
    in_branch = _in_branch_all(nodes, consumers, parent, output_nodes) if joins else []
    has_norm: list[bool] | None = None  # a normalization upstream of each node (asked for embeddings only)
    layers: dict[str, LayerInfo] = {}
    direct_output, reaches_layer = _reaches_all(nodes, consumers, output_nodes)
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
            info.gate = bool(gated) and _only_reaches(node.index, nodes, consumers, gated, "gate", output_nodes)
            info.attention_logits = (
                attends
                and not info.is_output
                and _only_reaches(node.index, nodes, consumers, gated, "logits", output_nodes)
            )
            info.in_branch = joins and in_branch[node.index]
            if info.kind == "embedding":
                has_norm = _has_norm_upstream(nodes) if has_norm is None else has_norm
                info.pre_norm_stream = _pre_norm_stream(node.index, nodes, consumers, has_norm)
    for node in nodes:
        if node.kind == "join":
            node.in_branch = in_branch[node.index]
    chain, normalized, activations, applications = _longest_plain_chain(nodes, depth, parent)
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


def _demote_arithmetic_joins(nodes: list[Node]) -> tuple[list[int], list[int | None]]:
    """Turn every join whose inputs crossed the same number of layers into a plain op, in place, and return
    the plain-chain DP (:func:`_plain_chain_dp`) of the nodes as they are then.

    An add/cat of such paths is arithmetic (rotary embeddings, x*cos + rot(x)*sin), not a skip connection: a
    skip bypasses at least one layer.
    """
    before = _plain_chain_dp(nodes)
    depth_before = before[0]
    first = None
    for node in nodes:
        if node.kind == "join" and len({depth_before[i] for i in node.inputs}) == 1:
            node.kind = "op"
            first = node.index if first is None else first
    # the nodes before the first demoted join keep their entries; from it on they are computed again
    return before if first is None else _plain_chain_dp(nodes, first, before)


def _longest_plain_chain(
    nodes: list[Node], depth: list[int], parent: list[int | None]
) -> tuple[list[str], bool, list[str], int]:
    """Walk back from the deepest node along the plain-chain parents (``_plain_chain_dp``'s): the distinct layers
    crossed (input first), whether a normalization lies on the way, the activations met (input first) and the
    weight applications."""
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
    info: LayerInfo,
    node: Node,
    nodes: list[Node],
    consumers: list[list[int]],
    output_nodes: set[int],
    reaches_layer: list[bool] | None = None,
) -> None:
    """Walk from a layer's output through pass-through ops to what really consumes it (``reaches_layer``: the
    answers of :func:`_reaches_layer` for every node, when already swept)."""
    if reaches_layer is None:
        reaches_layer = [_reaches_layer(i, nodes, consumers) for i in range(len(nodes))]
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
            elif consumer.kind == "join" and not past_norm:
                info.feeds_join = True
            elif consumer.kind == "layer":
                info.feeds_layer = True
            elif consumer.kind in ("op", "norm", "activation", "join"):
                info.feeds_layer |= reaches_layer[consumer_index]


def _reaches_all(nodes: list[Node], consumers: list[list[int]], outputs: set[int]) -> tuple[list[bool], list[bool]]:
    """For every node, in one backward sweep (consumers come later in execution order): whether a path from it
    reaches a model output through no layer or join (:func:`_reaches_output_directly`), and whether one
    reaches a layer (:func:`_reaches_layer`); the answers of the walks from each node."""
    output = [False] * len(nodes)
    layer = [False] * len(nodes)
    for index in range(len(nodes) - 1, -1, -1):
        direct, reaches = index in outputs, False
        for consumer_index in consumers[index]:
            consumer = nodes[consumer_index]
            if consumer.kind == "layer":
                reaches = True
            else:
                reaches = reaches or layer[consumer_index]
                if not direct and consumer.kind != "join" and index in consumer.inputs:
                    direct = output[consumer_index]
        output[index], layer[index] = direct, reaches
    return output, layer


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


def _in_branch_all(
    nodes: list[Node], consumers: list[list[int]], parent: list[int | None], outputs: set[int]
) -> list[bool]:
    """For every node: whether every path from it enters some join as a branch before it reaches the output (the
    layer or join sits inside a residual branch). A join entered as its stream is walked through, so the running
    sum of a branch's own accumulation (FocalNet's focal levels) is inside the branch that finally joins the
    stream.

    The answer for all nodes in one backward sweep (consumers come later in execution order): a node is in a
    branch when what it reaches by walking (through non-join consumers of its output, and joins it enters as the
    stream) holds no model output and at least one edge into a join as its branch; the same answer as walking
    from each node, without one walk per layer.
    """
    reaches_output = [False] * len(nodes)
    enters_branch = [False] * len(nodes)
    for index in range(len(nodes) - 1, -1, -1):
        output, branch = index in outputs, False
        for consumer_index in consumers[index]:
            consumer = nodes[consumer_index]
            if consumer.kind == "join" and parent[consumer_index] != index:
                branch = True
            elif consumer.kind == "join" or index in consumer.inputs:
                output |= reaches_output[consumer_index]
                branch |= enters_branch[consumer_index]
        reaches_output[index], enters_branch[index] = output, branch
    return [branch and not output for output, branch in zip(reaches_output, enters_branch, strict=True)]


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


def _has_norm_upstream(nodes: list[Node]) -> list[bool]:
    """For every node, whether it is or reads (transitively) a normalization's output."""
    has_norm = [False] * len(nodes)
    for node in nodes:
        has_norm[node.index] = node.kind == "norm" or any(has_norm[i] for i in node.inputs)
    return has_norm


def _pre_norm_stream(start: int, nodes: list[Node], consumers: list[list[int]], has_norm: list[bool]) -> bool:
    """An embedding output that, summed with other embeddings at most, is both read through a normalization
    and carried un-normalized into a residual join with a branch (the pre-LN residual stream); ``has_norm`` is
    :func:`_has_norm_upstream` of the nodes."""
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
            elif (consumer.kind == "pass" and index in consumer.inputs) or consumer.op in JOINS:
                frontier.append(consumer_index)
    return feeds_norm and residual
