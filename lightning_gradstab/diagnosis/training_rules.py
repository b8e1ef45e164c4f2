"""Rules over what training shows in its first steps: the loss trend, per-layer gradient norms, guard events.

Pure functions over plain inputs (a list of losses, per-layer median norms, typed guard events), so they are
tested without a Trainer; ``ArchitectureAdvisor`` only gathers the inputs and publishes the findings.

Example::

    evidence = loss_stall([2.30] * 50, stall_improvement=0.1)
    assert evidence is not None and evidence["relative_improvement"] == 0.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lightning_gradstab.diagnosis.arch_rules import (
    activation_finding,
    normalization_finding,
    recurrent_findings,
    residual_finding,
)
from lightning_gradstab.diagnosis.graph import ModelGraph
from lightning_gradstab.diagnosis.signal_rules import RATIO_ERROR, RATIO_WARNING
from lightning_gradstab.guard.config import RUNGS
from lightning_gradstab.guard_events import GuardEvent
from lightning_gradstab.report import Finding

MIN_LOSSES = 10
"""Losses needed before a trend is judged: the first and last tenth must hold at least one batch each."""

MIN_GRADIENT_LAYERS = 3
"""Layers with a measured gradient needed before first-over-last ratios mean a trend through depth."""

EXPLOSIVE_SPIKE_RATIO = 10.0
"""A clipped spike counts as exploding gradients when its norm was this many times its clip threshold."""


def loss_stall(losses: Sequence[float], stall_improvement: float) -> dict[str, float] | None:
    """Evidence of a stalled loss, or ``None`` when it improved by at least ``stall_improvement``.

    The improvement is relative, from the mean of the first tenth of ``losses`` to the mean of the last
    tenth: ``(first - last) / |first|``. A non-finite last tenth counts as no improvement.

    Example::

        loss_stall([2.0] * 10 + [1.0] * 10, 0.1) is None   # halved: not stalled
    """
    if len(losses) < MIN_LOSSES:
        return None
    tenth = max(1, len(losses) // 10)
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    improvement = (first - last) / abs(first) if first and math.isfinite(last) else 0.0
    if improvement >= stall_improvement:
        return None
    return {
        "loss_first": first,
        "loss_last": last,
        "relative_improvement": improvement,
        "stall_threshold": stall_improvement,
        "batches_observed": len(losses),
    }


def loss_findings(graph: ModelGraph | None, losses: Sequence[float], stall_improvement: float) -> list[Finding]:
    """``arch.residual`` (error) when a deep plain chain trains with a stalled loss (He et al. 2016)."""
    if graph is None:
        return []
    evidence = loss_stall(losses, stall_improvement)
    return residual_finding(graph, evidence) if evidence is not None else []


def gradient_findings(
    graph: ModelGraph | None,
    median_norms: Mapping[str, float],
    optimizer_steps: int,
    sizes: Mapping[str, int] | None = None,
) -> list[Finding]:
    """``signal.vanishing``/``signal.exploding`` from per-layer median weight-gradient norms, with causes.

    Only comparable layers are compared: per element (each norm divided by the square root of the layer's
    parameter count in ``sizes``, when given), and with a graph only the layers of the main signal path of
    the most common kind, in the graph's order; output layers (their gain scales every gradient alike), query/key
    projections (a near-uniform softmax at init), gates, residual-branch layers, embeddings and layers over
    constants are no reference. Comparing a first layer's query projection with a classifier compares roles, not
    depth. Without a graph, the measured order. When the first layer's value is 100x below (above) the last's,
    gradients vanish (explode) toward the input: a warning, an error past 10^4; the graph adds
    ``arch.normalization`` and ``arch.activation``.

    Example::

        gradient_findings(None, {"a": 1e-5, "b": 1e-3, "c": 1.0}, optimizer_steps=50)  # signal.vanishing
    """
    sizes = sizes or {}
    measured = {
        name: norm / math.sqrt(sizes[name]) if sizes.get(name) else norm
        for name, norm in median_norms.items() if math.isfinite(norm) and norm > 0
    }
    layers = _comparable_layers(graph, measured) if graph else list(measured)
    if len(layers) < MIN_GRADIENT_LAYERS:
        return []
    ratio = measured[layers[0]] / measured[layers[-1]]
    if 1 / RATIO_WARNING <= ratio <= RATIO_WARNING:
        return []
    vanishing = ratio < 1.0
    magnitude = 1 / ratio if vanishing else ratio
    signal = Finding(
        "signal.vanishing" if vanishing else "signal.exploding",
        "error" if magnitude > RATIO_ERROR else "warning",
        (layers[0], layers[-1]),
        {
            "weight_grad_first_over_last_median": ratio,
            "layers": len(layers),
            "optimizer_steps_observed": optimizer_steps,
        },
        f"Gradients {'vanish' if vanishing else 'explode'} from {layers[-1]} toward {layers[0]} during "
        "training: see arch.normalization / arch.activation, or run diagnose() for the per-layer deltas.",
    )
    findings = [signal]
    if graph is not None:
        findings += normalization_finding(graph, [signal]) + activation_finding(graph)
    return findings


def _comparable_layers(graph: ModelGraph, measured: Mapping[str, float]) -> list[str]:
    """The measured layers of the main signal path, of its most common kind, in the graph's order."""
    candidates = [
        layer for layer in graph.layers
        if layer.name in measured and layer.kind in ("linear", "conv", "recurrent", "other") and not layer.is_output
        and not layer.attention_logits and not layer.pooling_head and not layer.gate and not layer.in_branch
        and layer.on_signal_path
    ]
    kinds = [layer.kind for layer in candidates]
    common = max(set(kinds), key=kinds.count) if kinds else None
    return [layer.name for layer in candidates if layer.kind == common]


def means_explosion(event: GuardEvent) -> bool:
    """Whether a guard event is evidence of exploding gradients rather than routine adaptive clipping.

    The guard's resting rung clips the top of the healthy norm distribution (ZClip's band, about 1 % of the
    steps of a healthy run); such a clip is no finding. Escalations past that rung, non-finite gradients,
    growth, drift and a collapsing loss scale are; so is a spike an order of magnitude above its threshold.
    """
    if event.level > max(event.previous_level, RUNGS.index("clip")):
        return True
    if event.anomaly != "spike":
        return event.anomaly is not None
    norm, threshold = event.total_norm, event.clip_threshold
    return norm is None or not threshold or norm >= EXPLOSIVE_SPIKE_RATIO * threshold


def guard_findings(graph: ModelGraph | None, events: Sequence[GuardEvent], observe_steps: int) -> list[Finding]:
    """``signal.exploding`` (warning) when the guard met explosions within the first ``observe_steps``,
    plus ``arch.recurrent`` for the vanilla recurrent layers of ``graph``."""
    explosions = [e for e in events if e.step <= observe_steps and means_explosion(e)]
    if not explosions:
        return []
    findings = [
        Finding(
            "signal.exploding",
            "warning",
            (),
            {
                "guard_events": len(explosions),
                "max_level": max(e.level for e in explosions),
                "anomalies": sorted({e.anomaly for e in explosions if e.anomaly}),
                "first_step": min(e.step for e in explosions),
            },
            "ExplosionGuard acted during the first steps: lower the learning rate or add warmup, and fix "
            "the architectural findings listed with this one.",
        )
    ]
    if graph is not None:
        findings += recurrent_findings(graph)
    return findings
