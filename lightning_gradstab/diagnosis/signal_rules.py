"""Signal rules: read the probe's backpropagated deltas and activation statistics.

``signal.vanishing`` / ``signal.exploding`` compare the RMS of the gradient reaching the first and the last point
of the main signal path: the layers of a plain network, and in a residual one the skip connections' outputs plus
the layers outside residual branches (see :func:`measured_layers`). Under one learning rate, a ratio of 1e-2 means
the input side moves ~100x slower than the output side (warning); 1e-4 means it effectively does not train
(error; He et al. 2015 measured 3e-5..1e-7 for a Xavier-initialised 30-layer ReLU MLP that stays at chance). The
reverse ratios flag explosion; growth through normalized layers stays a warning however large: Yang et al. 2019
show that BatchNorm stacks amplify gradients toward the input at init by construction, and such plain stacks
train with their published recipe (He et al. 2016's plain nets), so no bound ties that growth to non-training.
The per-layer gain ``ratio ** (1 / (points - 1))`` is reported next to its critical value 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

from lightning_gradstab.diagnosis.graph import ModelGraph
from lightning_gradstab.diagnosis.probe_results import ActivationProbe, LayerProbe, ProbeResult
from lightning_gradstab.report import Finding

RATIO_WARNING = 1e2
RATIO_ERROR = 1e4
DEAD_WARNING, DEAD_ERROR = 0.5, 0.9
"""Fractions of ReLU units dead on the whole batch: more than half the width gone is a warning, 90% an error.

Half is also what a zero-bias unit reaches by chance at init when its inputs are strongly correlated across
the batch (pooled features, Squeeze-Excitation): its sign is then set by the weights, not the sample. So the
warning needs the fraction to exceed one half by more than two binomial standard errors, ``1/sqrt(units)``."""
SATURATED_WARNING, SATURATED_ERROR = 0.25, 0.75
"""Fractions of hidden sigmoid/tanh outputs in the tails (derivative < 1% of its peak)."""


@dataclass
class MeasuredLayer:
    """One module's backpropagated delta, aggregated over its calls (an RNN cell's time steps are one layer).

    ``grad_rms`` is the RMS over calls of the delta reaching the output; for a layer whose output is
    normalized it is multiplied by the output's std, since a normalization makes the delta inversely
    proportional to that arbitrary scale (``BN(aWu) = BN(Wu)``: the gradient scales as ``1/a``), and divided by
    a constant down-scaling applied right after the layer (LayerScale's ``gamma``, Touvron et al. 2021), which
    shrinks the delta on purpose.
    """

    name: str
    node: int
    grad_rms: float
    weight_grad_norm: float | None


def measured_layers(result: ProbeResult) -> list[MeasuredLayer]:
    """The points of the main signal path with a measured delta, in execution order.

    In a plain network these are its layers, one point per application of a weight (a Linear applied 24 times
    gives 24 points; a recurrent cell's time steps are one point). In a residual one the signal travels along
    the stream, so they are the skip connections' outputs plus the layers outside residual branches: a branch's
    layers get the stream's delta times the branch's own gain, which says nothing about depth (comparing a
    branch layer with a head layer is comparing roles). Embeddings (lookups), query/key projections (small
    gradient at init by construction: the softmax is near-uniform), gate layers (Squeeze-Excitation) and layers
    over constants (a position-bias MLP) are left out. Only points on the input side of the first global pool
    are compared (a pool over P positions divides each position's delta by P: the ratio would measure P), unless
    every delta there is exactly 0: a pool never zeroes a gradient, so the head side is then the reference.
    """
    pools = _pools_crossed(result.graph)
    probes = [p for p in sorted(result.layers + result.joins, key=lambda p: p.node) if p.grad_rms is not None]
    segment = min((pools[p.node] for p in probes), default=0)
    points = _points(result, [p for p in probes if pools[p.node] == segment])
    return points if any(p.grad_rms for p in points) else _points(result, probes)


def _points(result: ProbeResult, probes: list[LayerProbe]) -> list[MeasuredLayer]:
    graph = result.graph
    info = {layer.name: layer for layer in graph.layers}
    consumers = graph.consumers()
    squares: dict[object, list[float]] = {}
    first: dict[object, LayerProbe] = {}
    for probe in probes:
        if not graph.nodes[probe.node].signal:
            continue
        if probe.kind == "join":
            if graph.nodes[probe.node].kind != "join" or graph.nodes[probe.node].in_branch:
                continue  # arithmetic of one path (rotary embeddings), or a join inside a branch: not the stream
            normalized = any(graph.nodes[c].kind == "norm" for c in consumers[probe.node])
            scale = 1.0
        else:
            layer = info.get(probe.name)
            if (
                layer is None or probe.kind == "embedding" or layer.attention_logits or layer.pooling_head
                or layer.gate or layer.in_branch
            ):
                continue
            normalized, scale = layer.normalized, layer.downstream_scale
        assert probe.grad_rms is not None  # both callers pass only probes with a grad_rms
        value = probe.grad_rms * (probe.output_std if normalized else 1.0)
        if 0.0 < scale < 1.0:
            value /= scale  # a deliberate down-scaling (LayerScale) is no vanishing
        key = probe.name if probe.kind == "recurrent" else (probe.name, probe.node)
        squares.setdefault(key, []).append(value * value)
        first.setdefault(key, probe)
    return [
        MeasuredLayer(first[key].name, first[key].node, math.sqrt(sum(values) / len(values)),
                      first[key].weight_grad_norm)
        for key, values in squares.items()
    ]


def _pools_crossed(graph: ModelGraph) -> list[int]:
    """Per node: how many global pools (or class-token selections) lie between the inputs and it."""
    crossed: list[int] = []
    for node in graph.nodes:
        before = max((crossed[i] for i in node.inputs), default=0)
        crossed.append(before + int(node.global_reduction))
    return crossed


def point_module(result: ProbeResult, name: str) -> str:
    """The module a measured point stands for: a layer's own name, or for a skip connection ``join:<node>`` the
    last layer of the branch it adds (``"<layer> (+ skip)"``)."""
    if not name.startswith("join:"):
        return name
    nodes = result.graph.nodes
    parent = result.graph.chain_parent()
    index = int(name.split(":", 1)[1])
    for branch in nodes[index].inputs:
        if branch == parent[index]:
            continue
        cursor = branch
        while nodes[cursor].kind != "layer" and nodes[cursor].inputs:
            cursor = nodes[cursor].inputs[0]
        if nodes[cursor].kind == "layer":
            return f"{nodes[cursor].name} (+ skip)"
    return f"skip connection {index}"


def delta_ratio(result: ProbeResult) -> tuple[float, list[MeasuredLayer]] | None:
    """``(first/last delta RMS, measured layers in execution order)``; None with fewer than 3 layers.

    The last layer is the last one that is not an output layer: a head's gain multiplies every upstream delta
    alike (a small or zero-initialised head is deliberate), so it is no depth effect.
    """
    measured = measured_layers(result)
    outputs = {layer.name for layer in result.graph.layers if layer.is_output}
    hidden = [m for m in measured if m.name not in outputs]
    if len(hidden) >= 2 and len(measured) >= 3 and hidden[-1].grad_rms:
        measured = hidden  # else every hidden delta is 0: compare with the head, which still gets a gradient
    if len(measured) < 3 or not measured[-1].grad_rms or not math.isfinite(measured[-1].grad_rms):
        return None
    return measured[0].grad_rms / measured[-1].grad_rms, measured


def signal_findings(result: ProbeResult, cause: str) -> list[Finding]:
    """``signal.vanishing`` or ``signal.exploding`` from the probe, with ``cause`` as the recommendation."""
    return signal_findings_measured(result, cause, delta_ratio(result))


def signal_findings_measured(
    result: ProbeResult, cause: str, measured_ratio: tuple[float, list[MeasuredLayer]] | None
) -> list[Finding]:
    """:func:`signal_findings` from an already computed :func:`delta_ratio` of ``result`` (``diagnose`` needs the
    ratio for the cause first; walking the graph for the measured points once is enough)."""
    if measured_ratio is None:
        return []
    ratio, measured = measured_ratio
    if 1 / RATIO_WARNING <= ratio <= RATIO_WARNING:
        return []
    vanishing = ratio < 1.0
    magnitude = (1 / ratio if ratio > 0 else math.inf) if vanishing else ratio
    last = measured[-1].grad_rms
    # the layers whose delta is off by the warning factor relative to the reference layer
    affected = [
        point_module(result, p.name).removesuffix(" (+ skip)") for p in measured
        if ((p.grad_rms * RATIO_WARNING < last) if vanishing else (p.grad_rms > last * RATIO_WARNING))
    ]
    weight_grads = [p.weight_grad_norm for p in measured if p.weight_grad_norm]
    evidence: dict[str, object] = {
        "delta_rms_first_over_last": ratio,
        "per_layer_gain": ratio ** (1 / (len(measured) - 1)) if ratio > 0 else 0.0,
        "critical_per_layer_gain": 1.0,
        "layers_measured": len(measured),
        "first_layer": point_module(result, measured[0].name),
        "last_layer": point_module(result, measured[-1].name),
    }
    if len(weight_grads) >= 2:
        evidence["weight_grad_first_over_last"] = weight_grads[0] / weight_grads[-1]
    if result.factored_out:
        evidence["zero_heads_factored_out"] = list(result.factored_out)
    return [
        Finding(
            "signal.vanishing" if vanishing else "signal.exploding",
            "error" if magnitude > RATIO_ERROR and (vanishing or not result.graph.plain_chain_normalized)
            else "warning",
            tuple(dict.fromkeys(affected)),
            evidence,
            cause,
        )
    ]


def activation_findings(activations: list[ActivationProbe]) -> list[Finding]:
    """``activation.dead`` (ReLU units silent on the whole batch) and ``activation.saturated`` findings.

    A ReLU unit is dead when its pre-activation is negative on every sample: it gets no gradient, so no step
    revives it (Lu et al. 2019, "Dying ReLU"). Units silent only because the layer feeding them outputs exactly
    zero (``input_zero``: a branch behind a zero-initialised gain, as NFNet's squeeze-excitation after the
    zero-gain last convolution, Brock et al. 2021) are not dead but not started: the gain upstream gets a gradient
    and the first step brings their signal. A layer that outputs zero because its own weights are zero is
    ``init.symmetric``'s finding."""
    dead = [
        a for a in activations
        if a.dead_fraction is not None and not a.input_zero
        and a.dead_fraction >= min(DEAD_ERROR, DEAD_WARNING + a.units**-0.5)
    ]
    saturated = [
        a for a in activations
        if a.hidden and a.saturated_fraction is not None and a.saturated_fraction >= SATURATED_WARNING
    ]
    # cast: both lists keep only probes whose fraction was measured (not None)
    dead_fractions = [cast(float, a.dead_fraction) for a in dead]
    saturated_fractions = [cast(float, a.saturated_fraction) for a in saturated]
    return _fraction_finding(
        "activation.dead", dead, dead_fractions, "max_dead_fraction", DEAD_WARNING, DEAD_ERROR,
        "Revive {first}: check the init and bias of the layer feeding it (He init, zero bias), "
        "lower the learning rate, or use LeakyReLU/GELU there.",
    ) + _fraction_finding(
        "activation.saturated", saturated, saturated_fractions, "max_saturated_fraction",
        SATURATED_WARNING, SATURATED_ERROR,
        "Shrink the pre-activations of {first} (Xavier init on the layer feeding it, or a "
        "normalization layer before it), or switch to ReLU with He init.",
    )


def _fraction_finding(
    code: str,
    flagged: list[ActivationProbe],
    fractions: list[float],
    evidence_key: str,
    warning: float,
    error: float,
    recommendation: str,
) -> list[Finding]:
    """One finding for the activations whose unit fraction passed ``warning`` (error past ``error``);
    ``{first}`` in ``recommendation`` names the first of them."""
    if not flagged:
        return []
    worst = max(fractions)
    return [
        Finding(
            code,
            "error" if worst >= error else "warning",
            tuple(dict.fromkeys(a.name for a in flagged)),
            {evidence_key: worst, "activations": len(flagged), "threshold": warning},
            recommendation.format(first=_first(flagged)),
        )
    ]


def _first(items: list[ActivationProbe]) -> str:
    names = list(dict.fromkeys(a.name for a in items))
    return names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more)"
