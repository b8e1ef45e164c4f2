"""Architecture rules: normalization, skip connections, hidden activations, recurrent weights.

- ``arch.residual`` keys on depth without shortcuts, never on vanishing: plain BatchNorm nets degrade with
  healthy gradient norms (He et al. 2016; a NumPy reproduction on digits, plain MLP with BN: 1-2% train error at
  depth 8, 26-30% at 20, 80% at 56, residual ~1% throughout). ``diagnose`` flags plain chains of 30 or more
  layers (plain-34 is where He et al. see ImageNet nets degrade); the advisor flags 20 or more, as an error, when
  the training loss also stalls.
- ``arch.normalization`` needs a deep plain stack without normalization *and* a measured problem that the
  init does not explain (vanishing/exploding deltas, saturation, hidden sigmoids). Ioffe & Szegedy 2015: a
  10-layer sigmoid MLP stays at chance without BN and reaches ~0% train error with it.
- ``arch.activation``: sigmoid hidden units have slope <= 1/4 and non-zero-mean outputs, so the backward gain
  per layer is at most 1/4 (Glorot & Bengio 2010); with normalization in front they train, so normalized
  layers are exempt.
- ``arch.recurrent``: for a vanilla RNN with tanh (gamma = 1), a recurrent spectral radius above 1 is
  necessary for exploding gradients and below 1 sufficient for vanishing ones (Pascanu et al. 2013); the
  backward factor over the sequence is ~radius ** length.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_gradstab.diagnosis.graph import LayerInfo, ModelGraph
from lightning_gradstab.diagnosis.ops import activation_family
from lightning_gradstab.report import Finding, Severity

PLAIN_DEPTH_RESIDUAL = 20
"""With a stalled loss as evidence (the advisor), plain chains this deep get ``arch.residual``: the plain BN MLP
reproduction of He et al. 2016 already stalls at 20 layers (26-30% vs ~1% train error with skips)."""
PLAIN_DEPTH_RESIDUAL_UNOBSERVED = 30
"""Without training evidence (``diagnose``, ``InitAudit``) only plain chains this deep are flagged: He et al.
2016 (Fig. 4, Table 2) find plain-18 as good as ResNet-18 on ImageNet and plain-34 clearly worse, so published
plain nets of 20-30 layers (MobileNetV1's 28) are not predicted to degrade by depth alone."""
PLAIN_DEPTH_NORMALIZATION = 4
"""Below this many plain layers, missing normalization is not worth a finding."""
RECURRENT_EXPLODING_ERROR = 1e4
"""``radius ** length`` above this (the signal rules' error ratio) makes a radius above 1 an error."""
RECURRENT_VANISHING_FACTOR = 1e-2
"""``radius ** length`` below this: the first time steps get < 1% of the gradient of the last one."""


def residual_finding(graph: ModelGraph, loss_evidence: dict[str, float] | None = None) -> list[Finding]:
    """``arch.residual`` for a plain chain of >= 20 layers; an error when ``loss_evidence`` shows a stall."""
    threshold = PLAIN_DEPTH_RESIDUAL if loss_evidence else PLAIN_DEPTH_RESIDUAL_UNOBSERVED
    if graph.plain_depth < threshold:
        return []
    evidence: dict[str, object] = {
        "plain_depth": graph.plain_depth,
        "skip_connections": graph.skip_connections,
        "depth_threshold": threshold,
        "normalized": graph.plain_chain_normalized,
    }
    evidence.update(loss_evidence or {})
    chain = graph.plain_chain
    return [
        Finding(
            "arch.residual",
            "error" if loss_evidence else "warning",
            tuple(chain),
            evidence,
            f"Add identity skip connections around every 2 layers of the {len(chain)}-layer plain stack "
            f"{chain[0]} … {chain[-1]} (x + block(x), with a normalization layer inside each block).",
        )
    ]


def normalization_finding(graph: ModelGraph, problems: list[Finding]) -> list[Finding]:
    """``arch.normalization`` when a deep plain un-normalized stack shows one of ``problems``."""
    if graph.plain_chain_normalized or graph.plain_depth < PLAIN_DEPTH_NORMALIZATION or not problems:
        return []
    chain = graph.plain_chain
    severity: Severity = "error" if any(p.severity == "error" for p in problems) else "warning"
    return [
        Finding(
            "arch.normalization",
            severity,
            tuple(chain),
            {
                "plain_depth": graph.plain_depth,
                "normalization_layers": len(graph.normalization_layers),
                "triggered_by": sorted({p.code for p in problems}),
            },
            f"Add a normalization layer (BatchNorm1d/2d after each Linear/Conv, or LayerNorm) between the "
            f"layers of {chain[0]} … {chain[-1]}, before each activation.",
        )
    ]


def activation_finding(graph: ModelGraph) -> list[Finding]:
    """``arch.activation`` when two or more un-normalized hidden layers feed a sigmoid whose output is the next
    layer's input (a hidden activation; a sigmoid that gates, routes or scores another path is not one)."""
    layers = [
        layer for layer in graph.layers
        if activation_family(layer.activation) == "sigmoid" and layer.activation_feeds_layer and not layer.normalized
        and not layer.gate  # a Squeeze-Excitation gate: the sigmoid is its purpose, not the main path's
    ]
    if len(layers) < 2:
        return []
    names = tuple(layer.name for layer in layers)
    return [
        Finding(
            "arch.activation",
            "warning",
            names,
            {"hidden_sigmoid_layers": len(layers), "max_sigmoid_slope": 0.25, "sigmoid_output_mean": 0.5},
            f"Replace the sigmoid after {names[0]} … {names[-1]} with ReLU (and He init) or tanh (Xavier), "
            "or put a normalization layer before each sigmoid.",
        )
    ]


def recurrent_findings(graph: ModelGraph) -> list[Finding]:
    """``arch.recurrent`` for vanilla RNNs whose recurrent spectral radius explodes or vanishes."""
    findings = []
    for layer in graph.layers:
        module = layer.module
        if not isinstance(module, (nn.RNN, nn.RNNCell)):
            continue
        steps = _sequence_length(layer)
        recurrent = [p for n, p in module.named_parameters() if n.startswith("weight_hh")]
        if not recurrent:
            continue
        radius = max(_spectral_radius(w) for w in recurrent)
        nonlinearity = getattr(module, "nonlinearity", "tanh")
        evidence = {"spectral_radius": radius, "sequence_length": steps, "nonlinearity": nonlinearity,
                    "radius_pow_length": radius**steps if radius > 0 else 0.0}
        if radius > 1.0:
            # radius > 1 is necessary for exploding gradients, not sufficient: an error only when the potential
            # growth over the sequence passes the signal rules' error ratio
            growth = radius**steps
            findings.append(
                Finding(
                    "arch.recurrent",
                    "error" if growth > RECURRENT_EXPLODING_ERROR else "warning",
                    (layer.name,),
                    evidence,
                    f"Replace the vanilla RNN {layer.name} (recurrent spectral radius {radius:.2f} > 1: gradients "
                    "can explode) with nn.LSTM or nn.GRU, initialise weight_hh orthogonally, and clip gradients "
                    "(e.g. gradient_clip_val=1.0).",
                )
            )
        elif radius**steps < RECURRENT_VANISHING_FACTOR:
            findings.append(
                Finding(
                    "arch.recurrent",
                    "warning",
                    (layer.name,),
                    evidence,
                    f"Replace the vanilla RNN {layer.name} with nn.LSTM or nn.GRU: radius {radius:.2f} over "
                    f"{steps} steps leaves the first steps ~{radius**steps:.1e} of the gradient.",
                )
            )
    return findings


def trace_findings(graph: ModelGraph) -> list[Finding]:
    """``trace.incomplete`` (info) naming what the tracer could not see, so graph rules are not trusted blindly."""
    if not graph.problems and not graph.untraced:
        return []
    owners = sorted({name.rsplit(".", 1)[0] if "." in name else name for name in graph.untraced} | set(graph.missed))
    evidence: dict[str, object] = {"untraced_parameters": len(graph.untraced)}
    if graph.problems:
        evidence["problem"] = "; ".join(graph.problems)
    what = "; ".join(graph.problems) if graph.problems else f"parameters of {', '.join(owners[:4])} not seen in forward"
    return [
        Finding(
            "trace.incomplete",
            "info",
            tuple(owners),
            evidence,
            f"Could not trace everything ({what}); graph-based rules skipped these parts: call the eager "
            "(non-scripted) module, or use standard nn layers so they can be recognised.",
        )
    ]


def _sequence_length(layer: LayerInfo) -> int:
    module = layer.module
    if isinstance(module, nn.RNNCellBase):
        return layer.calls
    shape = layer.input_shape
    if len(shape) == 3:
        return shape[1] if getattr(module, "batch_first", False) else shape[0]
    return shape[0] if shape else 1


def _spectral_radius(weight: torch.Tensor) -> float:
    return float(torch.linalg.eigvals(weight.detach().double().cpu()).abs().max())
