"""Initialization rules: the weight scale each layer needs given the activation that consumes its output.

Theory: a layer multiplies the variance of the signal by ``fan_in * Var[w] * E[phi'(z)^2]`` forward, and the
backward delta by the same with ``fan_out``. Keeping that gain at its critical value 1 gives He
``Var[w] = 2 / fan_in`` for ReLU (He et al. 2015), ``2 / ((1 + a^2) fan_in)`` for leaky ReLU with slope ``a``,
LeCun ``1 / fan_in`` for SELU, and Xavier/Glorot ``2 / (fan_in + fan_out)`` for tanh, sigmoid and linear
outputs (Glorot & Bengio 2010). He et al. 2015 (section 2.2) show that the ``fan_out`` form, which preserves
the backward signal, is as good: over a whole network the two differ only by the ratio of the first and last
widths. So any variance between the ``fan_in`` and the ``fan_out`` form is accepted, and a layer's log ratio
to the nearer end of that range is what it contributes.

Ratios compound along a plain chain and are reset by a normalization (``BN(aWu) = BN(Wu)``, Ioffe & Szegedy
2015); constant scalings on the way (T5's ``d_model ** -0.5``, ``x * sqrt(d)``) count too. A chain is judged
where its scale matters: at the model output, and where a residual branch joins the stream. A branch joining
may be small (zero-init residual, LayerScale, GPT-2's ``1/sqrt(2 n_layer)``: deliberate, the skip carries the
signal), so there only a branch *larger* than the stream counts; an output layer may be small too (zero-init
heads, ``N(0, 0.01)`` classifiers: the head's own gradient does not depend on its scale), so only a head that
is too large counts. We flag a predicted factor outside [1/10, 10] (warning) or [1e-4, 1e4] (error: He et al.
2015's 22-layer ReLU net with Xavier init, predicted factor ~7e-4, still converges; the 30-layer one, ~4e-5,
stalls). Every layer on a flagged chain that is off in the flagged direction is named, plus every layer that is
off by more than ``sqrt(10)`` alone, so one pass names all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_gradstab.diagnosis import symmetry
from lightning_gradstab.diagnosis.graph import LayerInfo, ModelGraph
from lightning_gradstab.diagnosis.ops import activation_family
from lightning_gradstab.report import Finding, Severity

SIGNAL_FACTOR_WARNING = 10.0
SIGNAL_FACTOR_ERROR = 1e4
SPREAD_COLUMNS = symmetry.SPREAD_COLUMNS
LAYER_TOLERANCE = 1.25
"""Per-layer variance ratios within [1/1.25, 1.25] count as matching (sampling noise of small layers)."""


@dataclass(frozen=True)
class InitScheme:
    """A recommended initialization: its name, the target weight variance and how to apply it.

    Example::

        scheme = recommended_scheme(graph.layer("net.0"))
        scheme.apply(layer.weight, torch.Generator().manual_seed(0))
    """

    name: str
    variance: float

    @property
    def std(self) -> float:
        """Target standard deviation of the weights."""
        return math.sqrt(self.variance)

    def apply(self, weight: Tensor, generator: torch.Generator) -> None:
        """Re-draw ``weight`` in place from N(0, variance) with ``generator`` (identical on every rank)."""
        with torch.no_grad():
            weight.normal_(0.0, self.std, generator=generator)


def fans(weight: Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a Linear/Conv weight, as ``torch.nn.init`` computes them."""
    return nn.init._calculate_fan_in_and_fan_out(weight)


def layer_fans(layer: LayerInfo) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a layer: read from the op that applied it (``x @ W``, an einsum) where the tracer
    derived them, else ``torch.nn.init``'s convention on its weight, with a grouped convolution's fan-out per group.

    ``torch.nn.init`` counts a grouped convolution's fan-out as all its output channels times the kernel, but each
    input channel reaches only the outputs of its own group (pytorch/pytorch#23854, timm#84): a depthwise 3x3
    convolution has fan-in 9 and fan-out 9, not 9 x channels. Counted the torch way, the accepted range of
    variances (He et al. 2015's fan-in and fan-out forms) spans the channel count, and a depthwise stack drawn at
    N(0, 0.02) passed as initialised well while its signal fell ~20x per layer.
    """
    if layer.fans is not None:
        return layer.fans
    fan_in, fan_out = fans(cast(Tensor, layer.weight))  # cast: both callers check that the layer has a weight
    groups = getattr(layer.module, "groups", 1)
    if isinstance(layer.module, nn.modules.conv._ConvNd) and isinstance(groups, int) and groups > 1:
        fan_out //= groups
    return fan_in, fan_out


def recommended_scheme(layer: LayerInfo) -> InitScheme | None:
    """The init the layer needs for its consuming activation; None where scale is not ours to judge.

    Example::

        scheme = recommended_scheme(graph.layer("net.0"))  # He before a ReLU: variance 2 / fan_in
    """
    accepted = accepted_variance(layer)
    return accepted[0] if accepted else None


def accepted_variance(layer: LayerInfo) -> tuple[InitScheme, float, float] | None:
    """``(recommended scheme, lowest, highest accepted weight variance)``: the ``fan_in`` and ``fan_out`` forms
    of the rule for the layer's activation (He et al. 2015, section 2.2); None where scale is not judged.

    Example::

        scheme, low, high = accepted_variance(graph.layer("features.0"))
    """
    weight = layer.weight
    if layer.kind not in ("linear", "conv", "other") or weight is None or weight.dim() < 2:
        return None
    if layer.normalized or layer.gate or not layer.on_signal_path:
        return None
    fan_in, fan_out = layer_fans(layer)
    small, large = min(fan_in, fan_out), max(fan_in, fan_out)
    family = activation_family(layer.activation)
    if family == "relu":
        slope = layer.negative_slope
        gain = 2.0 / (1.0 + slope**2)
        name = (f"He/Kaiming normal (std = sqrt(2/((1+a^2)*fan_in)), a={slope:g})" if slope else
                "He/Kaiming normal (std = sqrt(2/fan_in))")
        return InitScheme(name, gain / fan_in), gain / large, gain / small
    if family == "selu":
        return InitScheme("LeCun normal (std = sqrt(1/fan_in))", 1.0 / fan_in), 1.0 / large, 1.0 / small
    linear_output = layer.activation is None and (layer.is_output or layer.feeds_layer or layer.feeds_join)
    if family in ("tanh", "sigmoid", "softmax") or linear_output:
        scheme = InitScheme("Xavier/Glorot normal (std = sqrt(2/(fan_in+fan_out)))", 2.0 / (fan_in + fan_out))
        return scheme, 1.0 / large, 1.0 / small
    return None


def layer_weight_moments(graph: ModelGraph) -> dict[str, tuple[float, float]]:
    """Per layer with a weight: ``(variance, row spread)`` of the weight (see :func:`_weight_moments`), read back
    at once. The probe takes them before its backward, to ask the gradient of the layers with identical rows.

    Example::

        variance, row_spread = layer_weight_moments(graph)["net.0"]
    """
    measured = [layer for layer in graph.layers if layer.weight is not None]
    if not measured:
        return {}
    variances, spreads = _weight_moments([cast(Tensor, layer.weight) for layer in measured])  # none is None
    return {layer.name: (v, r) for layer, v, r in zip(measured, variances, spreads, strict=True)}


def init_findings(
    graph: ModelGraph,
    output_std: dict[str, float] | None = None,
    moments: dict[str, tuple[float, float]] | None = None,
    gradient_rows: dict[str, tuple[float, float]] | None = None,
    vector_weights: set[str] | None = None,
    join_std: dict[int, float] | None = None,
) -> tuple[list[Finding], dict[str, InitScheme], dict[str, float]]:
    """``init.scale``, ``init.symmetric``, ``embedding.scale`` findings; the scheme and weight std per layer.

    ``output_std`` (measured by the probe) is what an embedding really puts into the stream, scalings inside
    its own forward included; without it the weight std is used. ``moments``: :func:`layer_weight_moments`
    when already taken. ``gradient_rows``: per layer with identical weight rows, the spread of its gradient's rows
    and the gradient's largest entry (:mod:`.symmetry`), when the probe measured them; ``vector_weights``: layers
    whose weight is derived from a one-dimensional parameter (no units to be identical). ``join_std``: the
    measured output std of each join node (by node index), the scale of a stream that an embedding starts together
    with other terms (positions, patches).

    Example::

        findings, schemes, weight_stds = init_findings(graph)
    """
    measured = [layer for layer in graph.layers if layer.weight is not None]
    if not measured:
        return [], {}, {}
    moments = moments if moments is not None else layer_weight_moments(graph)
    variance = {name: v for name, (v, _) in moments.items()}
    row_spread = {name: r for name, (_, r) in moments.items()}
    weight_std = {name: math.sqrt(v) for name, v in variance.items()}
    accepted = {layer.name: a for layer in measured if (a := accepted_variance(layer)) is not None}
    schemes = {name: a[0] for name, a in accepted.items()}
    findings = _scale_findings(graph, variance, accepted)
    findings += _symmetric_findings(
        measured, row_spread, weight_std, schemes, gradient_rows or {}, vector_weights or set()
    )
    findings += _embedding_findings(measured, {**weight_std, **(output_std or {})}, graph, join_std or {})
    return findings, schemes, weight_std


STACKED_WEIGHT_ELEMENTS = 1 << 16
"""Weights up to this size that share a shape are measured together, stacked: a few kernels for the group
instead of a few per weight (most of the cost on small layers is the call, not the arithmetic)."""


def _weight_moments(weights: list[Tensor]) -> tuple[list[float], list[float]]:
    """The variance of each weight and the spread of its rows (max - min over rows of its first columns; 0 for
    identical rows), read back to the host at once.

    Weights of one shape, dtype and device are stacked and reduced together when small; larger ones one by one
    (stacking would copy them). The variance is E[w^2] - E[w]^2 from one norm and one mean: single passes,
    cheaper than var() on very large weights.
    """
    groups: dict[tuple, list[int]] = {}
    for index, weight in enumerate(weights):
        key: tuple = (tuple(weight.shape), weight.dtype, weight.device)
        if weight.numel() > STACKED_WEIGHT_ELEMENTS:
            key += (index,)  # alone
        groups.setdefault(key, []).append(index)
    device = weights[0].device
    stats: list[Tensor] = []
    with torch.no_grad():  # no detach per weight; a float32 weight is read as it is (no conversion call)
        for indices in groups.values():
            members = [weights[i] if weights[i].dtype == torch.float32 else weights[i].float() for i in indices]
            stacked = members[0].unsqueeze(0) if len(members) == 1 else torch.stack(members)
            flat = stacked.reshape(len(members), -1)
            if stacked.dim() == 3:  # (weights, rows, columns) already
                rows = stacked
            else:
                rows = stacked.reshape(len(members), stacked.shape[1] if stacked.dim() > 3 else 1, -1)
            # identical rows are identical on any subset of columns; a random init differs on the first few already
            head = rows[:, :, :SPREAD_COLUMNS] if rows.shape[2] > SPREAD_COLUMNS else rows
            second_moment = torch.linalg.vector_norm(flat, dim=1).square() / flat.shape[1]
            variance = (second_moment - flat.mean(dim=1).square()).clamp_min(0.0)
            lowest, highest = torch.aminmax(head, dim=1)  # the same minima and maxima as amin and amax
            spread = (highest - lowest).amax(1)
            stats.append(variance if variance.device == device else variance.to(device))
            stats.append(spread if spread.device == device else spread.to(device))
    numbers = iter(torch.cat(stats).tolist())  # one host sync for all layers
    variances, spreads = [0.0] * len(weights), [0.0] * len(weights)
    for indices in groups.values():
        for index in indices:
            variances[index] = next(numbers)
        for index in indices:
            spreads[index] = next(numbers)
    return variances, spreads


def _log_ratios(graph: ModelGraph, variance: dict[str, float], accepted: dict) -> dict[str, float]:
    """Per layer: log of the weight variance over the nearer end of its accepted range (0 inside it)."""
    ratios = {}
    for layer in graph.layers:
        if layer.name not in accepted or variance.get(layer.name, 0.0) <= 0.0:
            continue
        _, low, high = accepted[layer.name]
        value = variance[layer.name]
        ratio = math.log(value / low) if value < low else (math.log(value / high) if value > high else 0.0)
        if layer.is_output:
            ratio = max(ratio, 0.0)  # a small head is deliberate (zero-init heads); a large one saturates
        ratios[layer.name] = ratio
    return ratios


def _scale_findings(graph: ModelGraph, variance: dict[str, float], accepted: dict) -> list[Finding]:
    log_ratio = _log_ratios(graph, variance, accepted)
    nodes, parent = graph.nodes, graph.chain_parent()
    # predicted log signal factor since the last normalization along each node's plain chain
    cumulative: list[float] = []
    origin: list[int | None] = []  # the normalization that reset the chain (None: the inputs)
    for node in nodes:
        p = parent[node.index]
        base = 0.0 if p is None else cumulative[p]  # a normalization's own entry is its gain
        origin.append(p if p is not None and nodes[p].kind == "norm" else (None if p is None else origin[p]))
        # every application of a weight multiplies the signal by its scale again (a Linear applied 24 times)
        own = 0.5 * log_ratio.get(node.name, 0.0) if node.kind == "layer" and node.adds_depth else 0.0
        if node.kind == "pass" and node.scale > 0:
            own += math.log(node.scale)
        cumulative.append(0.0 if node.kind == "norm" else base + own)
    # sinks: (node where the chain ends, chain factor, directions judged there, where the chain starts)
    sinks: list[tuple[int, float, tuple[float, ...], int | None]] = [
        (index, cumulative[index], (1.0, -1.0), origin[index]) for index in graph.outputs
    ]
    for node in nodes:
        if node.kind != "join":
            continue
        stream = parent[node.index]
        for branch in node.inputs:
            if branch == stream or stream is None:
                continue
            relative = cumulative[branch] - (cumulative[stream] if origin[branch] == origin[stream] else 0.0)
            sinks.append((branch, relative, (1.0,), stream if origin[branch] == origin[stream] else origin[branch]))
    limit = math.log(SIGNAL_FACTOR_WARNING)
    findings = []
    for direction in (-1.0, 1.0):
        flagged = [(i, f, start) for i, f, allowed, start in sinks if direction in allowed and f * direction > limit]
        if not flagged:
            continue
        names: dict[str, None] = {}
        for index, _, start in flagged:
            for name in _chain_layers(nodes, parent, index, start):
                if log_ratio.get(name, 0.0) * direction > math.log(LAYER_TOLERANCE):
                    names[name] = None
        alone = math.log(SIGNAL_FACTOR_WARNING)  # std off by more than sqrt(10): variance by more than 10
        info = {layer.name: layer for layer in graph.layers}
        for name, ratio in log_ratio.items():
            layer = info[name]
            deliberate = layer.in_branch or layer.feeds_join or layer.is_output  # may be small on purpose
            if ratio * direction > alone and (direction > 0 or not deliberate):
                names[name] = None
        order = {layer.name: i for i, layer in enumerate(graph.layers)}
        chain = sorted(names, key=lambda n: order.get(n, 0))
        if chain:
            worst = max(f * direction for _, f, _ in flagged)
            findings.append(_scale_finding(chain, math.exp(worst * direction), log_ratio, accepted))
    return findings


def _chain_layers(nodes: list, parent: list[int | None], end: int, start: int | None) -> list[str]:
    names: list[str] = []
    cursor: int | None = end
    while cursor is not None and cursor != start:
        if nodes[cursor].kind == "layer":
            names.append(nodes[cursor].name)
        cursor = parent[cursor]
    return names


def _scale_finding(chain: list[str], factor: float, log_ratio: dict[str, float], accepted: dict) -> Finding:
    by_scheme: dict[str, list[str]] = {}
    for name in chain:
        by_scheme.setdefault(accepted[name][0].name, []).append(name)
    severity: Severity = "error" if max(factor, 1 / factor) > SIGNAL_FACTOR_ERROR else "warning"
    ratios = [math.exp(0.5 * log_ratio[name]) for name in chain]
    fixes = "; ".join(f"{_names(names)} with {scheme}" for scheme, names in by_scheme.items())
    return Finding(
        "init.scale",
        severity,
        tuple(chain),
        {
            "predicted_signal_factor": factor,
            "weight_std_over_recommended_median": sorted(ratios)[len(ratios) // 2],
            "weight_std_over_recommended_min": min(ratios),
            "weight_std_over_recommended_max": max(ratios),
            "layers": len(chain),
            "recommended": sorted(by_scheme),
        },
        f"Re-initialise {fixes} (e.g. `nn.init.kaiming_normal_(w, nonlinearity='relu')` before ReLU, "
        "`nn.init.xavier_normal_(w)` before tanh/linear), or pass `InitAudit(fix=True)`.",
    )


def _symmetric_findings(
    measured: list[LayerInfo],
    row_spread: dict[str, float],
    weight_std: dict[str, float],
    schemes: dict[str, InitScheme],
    gradient_rows: dict[str, tuple[float, float]],
    vector_weights: set[str],
) -> list[Finding]:
    """Layers whose units start identical (see :mod:`.symmetry`): an error when their gradient rows tie too (or
    were not measured), so the units stay identical; a warning when only a constant, non-zero start is shared
    and the gradient tells the units apart (a rank-one start that training must undo); nothing for a zero start
    that the gradient separates (a router, gate or query zeroed on purpose)."""
    findings = []
    reported: set[str] = set()
    for layer in measured:
        if layer.name in reported or layer.name in vector_weights or row_spread[layer.name] != 0.0:
            continue
        if not symmetry.may_be_symmetric(layer):
            continue
        reported.add(layer.name)
        weight = cast(Tensor, layer.weight)  # measured keeps only layers with a weight
        evidence: dict[str, Any] = {
            "weight_std": weight_std[layer.name], "row_spread": row_spread[layer.name], "units": int(weight.shape[0])
        }
        severity: Severity = "error"
        why = "constant or identical rows keep its units identical under gradient descent"
        zero = weight_std[layer.name] == 0.0 and not bool(weight.detach().any())
        if layer.name in gradient_rows:
            spread, scale = gradient_rows[layer.name]
            evidence["gradient_row_spread"] = spread
            if not symmetry.gradient_ties(spread, scale):
                if zero:
                    continue  # zero on purpose: the first step's gradient already tells the units apart
                severity = "warning"
                why = ("its units start identical and only their gradients tell them apart: a rank-one start that "
                       "training must first undo")
        if severity == "error" and zero and layer.attention_logits:
            # a zero term of attention logits (a query, a relative-position table: SAM's start at zero) makes the
            # attention uniform, not hidden units identical: the values still carry and train the signal
            severity = "info"
            why = ("its attention logits start at zero, so the attention starts uniform, and no gradient told its "
                   "rows apart on this batch; the values still train")
        scheme = schemes.get(layer.name)
        fix = (
            f"Keep {layer.name} at zero if a uniform start is intended, else draw it randomly"
            if severity == "info"
            else f"Re-initialise {layer.name} randomly ({scheme.name if scheme else 'Xavier/Glorot normal'})"
        )
        findings.append(Finding("init.symmetric", severity, (layer.name,), evidence, f"{fix}: {why}."))
    return findings


def _embedding_findings(
    measured: list[LayerInfo], weight_std: dict[str, float], graph: ModelGraph, join_std: dict[int, float]
) -> list[Finding]:
    # pre-LN residual stream: LN rescales the branch input, so a tiny stream is dominated by the first branch
    # updates and its gradients are amplified (Takase et al. 2023, "Spike No More": keep embeddings at std ~1).
    # The stream is what enters the first skip connection: an embedding summed there with other terms (a position
    # table added to patch projections) is judged by the sum's measured scale, not its own
    def stream_std(layer: LayerInfo) -> float:
        own = weight_std[layer.name] * layer.downstream_scale
        cursor = layer.stream_start
        while cursor is not None and graph.nodes[cursor].kind == "pass" and graph.nodes[cursor].inputs:
            cursor = graph.nodes[cursor].inputs[0]
        if cursor is None or graph.nodes[cursor].kind != "join" or cursor not in join_std:
            return own
        return join_std[cursor]

    stds_by_layer = {
        layer.name: stream_std(layer) for layer in measured if layer.kind == "embedding" and layer.pre_norm_stream
    }
    tiny = [layer for layer in measured if stds_by_layer.get(layer.name, math.inf) < 0.1]
    if not tiny:
        return []
    stds = [stds_by_layer[layer.name] for layer in tiny]
    names = ", ".join(layer.name for layer in tiny)
    return [
        Finding(
            "embedding.scale",
            "warning",
            tuple(layer.name for layer in tiny),
            {"embedding_std": weight_std[tiny[0].name], "scale_applied": tiny[0].downstream_scale,
             "residual_stream_std": max(stds)},
            f"Scale the output of {names} to std ~1 (multiply by sqrt(d_model) or add a LayerNorm after it) before "
            "the pre-LN residual stream (Takase et al. 2023).",
        )
    ]


def _names(names: list[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]}, {names[1]}, …, {names[-1]} ({len(names)} layers)"


def reinitialize(
    model: nn.Module, schemes: dict[str, InitScheme], names: list[str], seed: int
) -> dict[str, InitScheme]:
    """Re-draw the weights of modules ``names`` (biases zeroed); returns the scheme applied to each module.

    A name may also be a weight applied in ``forward`` (``w.3`` of a ``ParameterList``, ``W[3]``: the slice of a
    stacked weight), as the layer table names functional layers. A module without an entry in ``schemes`` gets
    Xavier/Glorot normal. A generator seeded with ``seed`` and the module's position makes the result identical
    on every rank.

    Example::

        applied = reinitialize(model, schemes, ["net.0", "net.2"], seed=0)
    """
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    applied: dict[str, InitScheme] = {}
    for position, name in enumerate(dict.fromkeys(names)):
        module = modules.get(name)
        weight = getattr(module, "weight", None) if module is not None else _functional_weight(parameters, name)
        if isinstance(weight, Tensor) and weight.dim() == 1:  # a normalization's gain: back to the usual 1
            with torch.no_grad():
                weight.fill_(1.0)
                bias = getattr(module, "bias", None)
                if isinstance(bias, Tensor):
                    bias.zero_()
            applied[name] = InitScheme("normalization gain 1", 1.0)
            continue
        if not isinstance(weight, Tensor) or weight.dim() < 2:
            continue
        fan_in, fan_out = fans(weight)
        scheme = schemes.get(name) or InitScheme("Xavier/Glorot normal", 2.0 / (fan_in + fan_out))
        generator = torch.Generator(device=weight.device).manual_seed(seed + position)
        scheme.apply(weight, generator)
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor):
            with torch.no_grad():
                bias.zero_()
        applied[name] = scheme
    return applied


def _functional_weight(parameters: dict[str, nn.Parameter], name: str) -> Tensor | None:
    """The weight a functional layer name stands for: a parameter (``w.3``) or a slice of one (``W[3]``)."""
    base, _, index = name.partition("[")
    parameter = parameters.get(base)
    if parameter is None or not index:
        return parameter
    try:
        return parameter[int(index.rstrip("]"))]
    except (ValueError, IndexError):
        return None
