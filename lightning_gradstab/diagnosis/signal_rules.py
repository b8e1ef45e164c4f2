"""Signal rules: read the probe's backpropagated deltas and activation statistics.

``signal.vanishing`` / ``signal.exploding`` compare the RMS of the gradient reaching the first and the last
parameterised layer's output. Under one learning rate, a ratio of 1e-2 means the input layers move ~100x
slower than the output layers (warning); 1e-4 means they effectively do not train (error; He et al. 2015
measured 3e-5..1e-7 for a Xavier-initialised 30-layer ReLU MLP that stays at chance). The reverse ratios
flag explosion. The per-layer gain ``ratio ** (1 / (layers - 1))`` is reported next to its critical value 1.
"""

from __future__ import annotations

import math

from lightning_gradstab.diagnosis.probe import ActivationProbe, LayerProbe, ProbeResult
from lightning_gradstab.report import Finding

RATIO_WARNING = 1e2
RATIO_ERROR = 1e4
DEAD_WARNING, DEAD_ERROR = 0.5, 0.9
"""Fractions of ReLU units dead on the whole batch: half the width gone is a warning, 90% an error."""
SATURATED_WARNING, SATURATED_ERROR = 0.25, 0.75
"""Fractions of hidden sigmoid/tanh outputs in the tails (derivative < 1% of its peak)."""


def delta_ratio(layers: list[LayerProbe]) -> tuple[float, list[LayerProbe]] | None:
    """``(first/last delta RMS, measured layers in execution order)``; None with fewer than 3 layers."""
    measured = [p for p in sorted(layers, key=lambda p: p.node) if p.grad_rms is not None and p.kind != "embedding"]
    if len(measured) < 3 or not measured[-1].grad_rms or not math.isfinite(measured[-1].grad_rms):
        return None
    return measured[0].grad_rms / measured[-1].grad_rms, measured


def signal_findings(result: ProbeResult, cause: str) -> list[Finding]:
    """``signal.vanishing`` or ``signal.exploding`` from the probe, with ``cause`` as the recommendation."""
    measured_ratio = delta_ratio(result.layers)
    if measured_ratio is None:
        return []
    ratio, measured = measured_ratio
    if 1 / RATIO_WARNING <= ratio <= RATIO_WARNING:
        return []
    vanishing = ratio < 1.0
    magnitude = (1 / ratio if ratio > 0 else math.inf) if vanishing else ratio
    last = measured[-1].grad_rms
    # the layers whose delta is off by the warning factor relative to the output layer
    affected = [
        p.name for p in measured
        if ((p.grad_rms * RATIO_WARNING < last) if vanishing else (p.grad_rms > last * RATIO_WARNING))
    ]
    weight_grads = [p.weight_grad_norm for p in measured if p.weight_grad_norm]
    evidence: dict[str, object] = {
        "delta_rms_first_over_last": ratio,
        "per_layer_gain": ratio ** (1 / (len(measured) - 1)) if ratio > 0 else 0.0,
        "critical_per_layer_gain": 1.0,
        "layers_measured": len(measured),
        "first_layer": measured[0].name,
        "last_layer": measured[-1].name,
    }
    if len(weight_grads) >= 2:
        evidence["weight_grad_first_over_last"] = weight_grads[0] / weight_grads[-1]
    return [
        Finding(
            "signal.vanishing" if vanishing else "signal.exploding",
            "error" if magnitude > RATIO_ERROR else "warning",
            tuple(dict.fromkeys(affected)),
            evidence,
            cause,
        )
    ]


def activation_findings(activations: list[ActivationProbe]) -> list[Finding]:
    """``activation.dead`` (ReLU units silent on the whole batch) and ``activation.saturated`` findings."""
    dead = [a for a in activations if a.dead_fraction is not None and a.dead_fraction >= DEAD_WARNING]
    saturated = [
        a for a in activations
        if a.hidden and a.saturated_fraction is not None and a.saturated_fraction >= SATURATED_WARNING
    ]
    return _fraction_finding(
        "activation.dead", dead, [a.dead_fraction for a in dead], "max_dead_fraction", DEAD_WARNING, DEAD_ERROR,
        "Revive {first}: check the init and bias of the layer feeding it (He init, zero bias), "
        "lower the learning rate, or use LeakyReLU/GELU there.",
    ) + _fraction_finding(
        "activation.saturated", saturated, [a.saturated_fraction for a in saturated], "max_saturated_fraction",
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
