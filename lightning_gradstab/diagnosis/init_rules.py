"""Initialization rules: the weight scale each layer needs given the activation that consumes its output.

Theory (PAPERS.md): a layer multiplies the variance of the signal by ``fan_in * Var[w] * E[phi'(z)^2]``
(forward, and the same with ``fan_out`` backward). Keeping that gain at its critical value 1 gives He
``Var[w] = 2 / fan_in`` for ReLU (He et al. 2015), ``2 / ((1 + a^2) fan_in)`` for leaky ReLU with slope ``a``,
LeCun ``1 / fan_in`` for SELU, and Xavier/Glorot ``2 / (fan_in + fan_out)`` for tanh, sigmoid and linear
outputs (Glorot & Bengio 2010). A ratio ``r = Var[w] / Var_recommended`` per layer compounds along a plain
chain: the signal scale after the chain is ``prod(sqrt(r))``. We flag a chain when that predicted factor
leaves [1/10, 10] (warning) or [1/1000, 1000] (error): one order of magnitude is where the first layers start
to learn noticeably slower or faster than the last under one learning rate.

Scale is *not* checked where it does not matter or is a deliberate choice: layers followed by a normalization
(``BN(aWu) = BN(Wu)``, Ioffe & Szegedy 2015), layers that end a residual branch (zero or down-scaled on
purpose: Fixup, GPT-2), and layers whose consumer we do not understand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_gradstab.diagnosis.graph import LayerInfo, ModelGraph, activation_family
from lightning_gradstab.report import Finding

SIGNAL_FACTOR_WARNING = 10.0
SIGNAL_FACTOR_ERROR = 1000.0
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


def recommended_scheme(layer: LayerInfo) -> InitScheme | None:
    """The init the layer needs for its consuming activation; None where scale is not ours to judge.

    Example::

        scheme = recommended_scheme(graph.layer("net.0"))  # He before a ReLU: variance 2 / fan_in
    """
    weight = layer.weight
    if layer.kind not in ("linear", "conv", "other") or weight is None or weight.dim() < 2:
        return None
    if layer.normalized or layer.feeds_join:
        return None
    fan_in, fan_out = fans(weight)
    family = activation_family(layer.activation)
    if family == "relu":
        slope = layer.negative_slope
        return InitScheme(
            f"He/Kaiming normal (std = sqrt(2/((1+a^2)*fan_in)), a={slope:g})" if slope else
            "He/Kaiming normal (std = sqrt(2/fan_in))",
            2.0 / ((1.0 + slope**2) * fan_in),
        )
    if family == "selu":
        return InitScheme("LeCun normal (std = sqrt(1/fan_in))", 1.0 / fan_in)
    linear_output = layer.activation is None and (layer.is_output or layer.feeds_layer)
    if family in ("tanh", "sigmoid", "softmax") or linear_output:
        return InitScheme("Xavier/Glorot normal (std = sqrt(2/(fan_in+fan_out)))", 2.0 / (fan_in + fan_out))
    return None


def init_findings(graph: ModelGraph) -> tuple[list[Finding], dict[str, InitScheme], dict[str, float]]:
    """``init.scale``, ``init.symmetric``, ``embedding.scale`` findings; the scheme and weight std per layer.

    Example::

        findings, schemes, weight_stds = init_findings(graph)
    """
    measured = [layer for layer in graph.layers if layer.weight is not None]
    if not measured:
        return [], {}, {}
    weights = [layer.weight.detach().float() for layer in measured]
    device = weights[0].device
    stats = []
    for weight in weights:
        rows = weight.reshape(weight.shape[0], -1) if weight.dim() >= 2 else weight.reshape(1, -1)
        stats += [weight.var(unbiased=False), (rows - rows[:1]).abs().amax()]
    numbers = torch.stack([s.to(device) for s in stats]).tolist()  # one host sync for all layers
    variance = {layer.name: numbers[2 * i] for i, layer in enumerate(measured)}
    row_spread = {layer.name: numbers[2 * i + 1] for i, layer in enumerate(measured)}
    weight_std = {name: math.sqrt(v) for name, v in variance.items()}
    schemes = {layer.name: s for layer in measured if (s := recommended_scheme(layer)) is not None}
    findings = _scale_findings(graph, variance, schemes)
    findings += _symmetric_findings(measured, row_spread, weight_std, schemes)
    findings += _embedding_findings(measured, weight_std)
    return findings, schemes, weight_std


def _scale_findings(graph: ModelGraph, variance: dict[str, float], schemes: dict[str, InitScheme]) -> list[Finding]:
    log_ratio = {
        name: math.log(variance[name] / scheme.variance)
        for name, scheme in schemes.items()
        if variance.get(name, 0.0) > 0.0
    }
    # predicted log signal factor along each node's plain chain (half the log variance ratio per layer)
    parent = graph.chain_parent()
    cumulative: list[float] = []
    for node in graph.nodes:
        base = cumulative[parent[node.index]] if parent[node.index] is not None else 0.0
        cumulative.append(base + (0.5 * log_ratio.get(node.name, 0.0) if node.kind == "layer" else 0.0))
    if not cumulative:
        return []
    worst = max(range(len(cumulative)), key=lambda i: abs(cumulative[i]))
    factor = math.exp(cumulative[worst])
    if max(factor, 1 / factor) <= SIGNAL_FACTOR_WARNING:
        return []
    direction = 1.0 if cumulative[worst] > 0 else -1.0
    chain: list[str] = []
    cursor: int | None = worst
    while cursor is not None:
        name = graph.nodes[cursor].name
        ratio = log_ratio.get(name) if graph.nodes[cursor].kind == "layer" else None
        if ratio is not None and ratio * direction > math.log(LAYER_TOLERANCE) and name not in chain:
            chain.append(name)
        cursor = parent[cursor]
    chain.reverse()
    by_scheme: dict[str, list[str]] = {}
    for name in chain:
        by_scheme.setdefault(schemes[name].name, []).append(name)
    severity = "error" if max(factor, 1 / factor) > SIGNAL_FACTOR_ERROR else "warning"
    ratios = [math.exp(0.5 * log_ratio[name]) for name in chain]
    fixes = "; ".join(f"{_names(names)} with {scheme}" for scheme, names in by_scheme.items())
    return [
        Finding(
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
    ]


def _symmetric_findings(
    measured: list[LayerInfo],
    row_spread: dict[str, float],
    weight_std: dict[str, float],
    schemes: dict[str, InitScheme],
) -> list[Finding]:
    findings = []
    for layer in measured:
        weight = layer.weight
        if layer.kind not in ("linear", "conv", "other") or weight.dim() < 2 or weight.shape[0] < 2:
            continue
        # identical rows make every unit compute the same function forever (the gradient keeps them equal);
        # zero on purpose is fine where the layer ends a residual branch or is the output head
        if row_spread[layer.name] != 0.0 or layer.feeds_join or not layer.feeds_layer:
            continue
        scheme = schemes.get(layer.name)
        findings.append(
            Finding(
                "init.symmetric",
                "error",
                (layer.name,),
                {"weight_std": weight_std[layer.name], "row_spread": row_spread[layer.name],
                 "units": int(weight.shape[0])},
                f"Re-initialise {layer.name} randomly "
                f"({scheme.name if scheme else 'Xavier/Glorot normal'}): constant or identical rows keep "
                "its units identical under gradient descent.",
            )
        )
    return findings


def _embedding_findings(measured: list[LayerInfo], weight_std: dict[str, float]) -> list[Finding]:
    findings = []
    for layer in measured:
        if layer.kind != "embedding" or not (layer.normalized and layer.feeds_join):
            continue
        # pre-LN residual stream: LN rescales the branch input, so a tiny stream is dominated by the first
        # branch updates and its gradients are amplified ("Spike No More": keep embeddings at std ~1)
        effective_std = weight_std[layer.name] * layer.downstream_scale
        if effective_std >= 0.1:
            continue
        findings.append(
            Finding(
                "embedding.scale",
                "warning",
                (layer.name,),
                {"embedding_std": weight_std[layer.name], "scale_applied": layer.downstream_scale,
                 "residual_stream_std": effective_std},
                f"Scale the output of {layer.name} to std ~1 (multiply by sqrt(d_model) or add a LayerNorm "
                "after it) before the pre-LN residual stream.",
            )
        )
    return findings


def _names(names: list[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]}, {names[1]}, …, {names[-1]} ({len(names)} layers)"


def reinitialize(
    model: nn.Module, schemes: dict[str, InitScheme], names: list[str], seed: int
) -> dict[str, InitScheme]:
    """Re-draw the weights of modules ``names`` (biases zeroed); returns the scheme applied to each module.

    A module without an entry in ``schemes`` gets Xavier/Glorot normal. A generator seeded with ``seed`` and
    the module's position makes the result identical on every rank.

    Example::

        applied = reinitialize(model, schemes, ["net.0", "net.2"], seed=0)
    """
    modules = dict(model.named_modules())
    applied: dict[str, InitScheme] = {}
    for position, name in enumerate(dict.fromkeys(names)):
        module = modules.get(name)
        weight = getattr(module, "weight", None)
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
