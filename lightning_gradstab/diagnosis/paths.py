"""The questions asked of the paths through the recorded nodes (path analysis).

For each node: which nodes read its output, the plain-chain depth (the most weight applications a signal must
cross with no skip connection offering a shorter path) and the input it was reached along, whether a path from it
reaches a layer or a model output, whether it lies inside a residual branch, whether it only feeds a gate or
attention logits, and whether an embedding's output is carried into a pre-LN residual stream. Nodes come in
execution order (consumers after the nodes they read), so most answers are one backward sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from lightning_gradstab.diagnosis.nodes import Node
from lightning_gradstab.diagnosis.ops import JOINS


def node_consumers(nodes: list[Node]) -> list[list[int]]:
    """For every node, the nodes that read its output as a main or side input, in execution order."""
    consumers: list[list[int]] = [[] for _ in nodes]
    for node in nodes:
        for i in dict.fromkeys(node.inputs + node.side_inputs):
            consumers[i].append(node.index)
    return consumers


def plain_chain_depths(
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


def demote_arithmetic_joins(nodes: list[Node]) -> tuple[list[int], list[int | None]]:
    """Turn every join whose inputs crossed the same number of layers into a plain op, in place, and return
    the plain-chain DP (:func:`plain_chain_depths`) of the nodes as they are then.

    An add/cat of such paths is arithmetic (rotary embeddings, x*cos + rot(x)*sin), not a skip connection: a
    skip bypasses at least one layer.
    """
    before = plain_chain_depths(nodes)
    depth_before = before[0]
    first = None
    for node in nodes:
        if node.kind == "join" and len({depth_before[i] for i in node.inputs}) == 1:
            node.kind = "op"
            first = node.index if first is None else first
    # the nodes before the first demoted join keep their entries; from it on they are computed again
    return before if first is None else plain_chain_depths(nodes, first, before)


def longest_plain_chain(
    nodes: list[Node], depth: list[int], parent: list[int | None]
) -> tuple[list[str], bool, list[str], int]:
    """Walk back from the deepest node along the plain-chain parents (``plain_chain_depths``'s): the distinct layers
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


def reaches_all(nodes: list[Node], consumers: list[list[int]], outputs: set[int]) -> tuple[list[bool], list[bool]]:
    """For every node, in one backward sweep (consumers come later in execution order): whether a path from it
    reaches a model output through no layer or join (:func:`_reaches_output_directly`), and whether one
    reaches a layer (:func:`reaches_a_layer`); the answers of the walks from each node."""
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


def _layer_ahead(
    start: int, nodes: list[Node], consumers: list[list[int]], through: Callable[[int, Node], bool]
) -> bool:
    """Whether a layer consumes the output of node ``start`` directly or through consumers that ``through(index,
    consumer)`` lets the walk pass (``index``: the node whose output the consumer reads)."""
    frontier, seen = [start], set()
    while frontier:
        index = frontier.pop()
        if index in seen:
            continue
        seen.add(index)
        for consumer_index in consumers[index]:
            consumer = nodes[consumer_index]
            if consumer.kind == "layer":
                return True
            if through(index, consumer):
                frontier.append(consumer_index)
    return False


def _any_consumer(index: int, consumer: Node) -> bool:
    return True


def reaches_a_layer(start: int, nodes: list[Node], consumers: list[list[int]]) -> bool:
    return _layer_ahead(start, nodes, consumers, _any_consumer)


def _carries_values(index: int, consumer: Node) -> bool:
    return consumer.kind in ("pass", "norm") and index not in consumer.side_inputs


def feeds_a_layer_directly(start: int, nodes: list[Node], consumers: list[list[int]]) -> bool:
    """Whether the output of node ``start`` is the input of a layer through reshapes, dropout and normalizations
    only, as a hidden activation's output is; not when it only scales, selects or routes something else (a
    sigmoid gate or router score multiplying another path, a top-k choice, an index)."""
    return _layer_ahead(start, nodes, consumers, _carries_values)


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


def in_branch_all(
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


def only_reaches(
    start: int, nodes: list[Node], consumers: list[list[int]], gated: set[int], what: str, outputs: set[int]
) -> bool:
    """Whether every path from ``start`` (through non-layer nodes) ends in a gate (``what="gate"``: a side input
    of a gated product), in attention logits (``what="logits"``: a softmax, or the query/key of a fused
    attention call) or in the key or value of an attention pooling (``what="pooling"``: a fused attention whose
    query is learned, not computed from the signal), with at least one such path."""

    def step(index: int, consumer_index: int) -> _PathStep:
        consumer = nodes[consumer_index]
        softmax = consumer.kind == "activation" and consumer.op in ("softmax", "log_softmax")
        if (what == "gate" and index in consumer.side_inputs) or (what == "logits" and softmax):
            return "found"
        if what == "logits" and consumer.op == "scaled_dot_product_attention":
            return "fail" if index in consumer.value_inputs else "found"
        if what == "pooling" and consumer.op == "scaled_dot_product_attention":
            return "found" if consumer.pooling_attention else "fail"
        if consumer.kind == "layer" and what in ("logits", "pooling"):
            return "fail"
        return "follow"

    return _every_path_ends(start, consumers, outputs, step)


def has_norm_upstream(nodes: list[Node]) -> list[bool]:
    """For every node, whether it is or reads (transitively) a normalization's output."""
    has_norm = [False] * len(nodes)
    for node in nodes:
        has_norm[node.index] = node.kind == "norm" or any(has_norm[i] for i in node.inputs)
    return has_norm


def pre_norm_stream(
    start: int, nodes: list[Node], consumers: list[list[int]], has_norm: list[bool]
) -> int | None:
    """An embedding output that, summed with other embeddings at most, is both read through a normalization
    and carried un-normalized into a residual join with a branch (the pre-LN residual stream); ``has_norm`` is
    :func:`has_norm_upstream` of the nodes.

    A residual join adds a branch computed from a normalization of the stream itself, ``x + f(norm(x))``, where
    ``x`` may reach the join through reshapes and constant or per-feature scalings (Doge's and ZAYA's scaled
    residuals). A normalized tensor computed from another path and added to the embedding (value embeddings
    summed into an attention's values, as NeoMME and modded-nanogpt do) makes no stream of it, and neither does a
    post-LN block, ``norm(x + f(x))``, whose branch reads ``x`` itself.

    Returns the node that enters the first such skip connection as the stream (the embedding's output, or its sum
    with the other terms that start the stream: positions, patches), None when the embedding starts no pre-LN
    stream."""
    frontier: list[tuple[int, tuple[int, ...]]] = [(start, (start,))]  # a stream node, the segment since a join
    seen: set[int] = set()
    feeds_norm = False
    stream: int | None = None
    while frontier:
        index, segment = frontier.pop()
        if index in seen:
            continue
        seen.add(index)
        for consumer_index in consumers[index]:
            consumer = nodes[consumer_index]
            if consumer.kind == "norm":
                feeds_norm = True
            elif consumer.kind == "join":
                if stream is None:  # one skip connection makes the stream
                    own_norms = {c for n in segment for c in consumers[n] if nodes[c].kind == "norm"}
                    if any(has_norm[i] and _computed_from(i, own_norms, nodes) for i in consumer.inputs if i != index):
                        stream = index
                frontier.append((consumer_index, (consumer_index,)))
            elif (consumer.kind == "pass" and index in consumer.inputs) or consumer.op in JOINS:
                frontier.append((consumer_index, (*segment, consumer_index)))
    return stream if feeds_norm else None


def _computed_from(index: int, sources: set[int], nodes: list[Node]) -> bool:
    """Whether node ``index`` is one of ``sources`` or computed from one (a walk back over inputs that stops at
    nodes older than every source: nodes come in execution order)."""
    if not sources:
        return False
    oldest = min(sources)
    frontier, seen = [index], set()
    while frontier:
        cursor = frontier.pop()
        if cursor in sources:
            return True
        if cursor in seen or cursor < oldest:
            continue
        seen.add(cursor)
        frontier.extend(nodes[cursor].inputs)
    return False
