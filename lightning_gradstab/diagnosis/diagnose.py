"""``diagnose``: trace, probe and apply every rule to a model on one real batch."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from itertools import pairwise
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_gradstab.compiled import eager_module
from lightning_gradstab.diagnosis.arch_rules import (
    PLAIN_DEPTH_RESIDUAL,
    PLAIN_DEPTH_RESIDUAL_UNOBSERVED,
    activation_finding,
    normalization_finding,
    recurrent_findings,
    residual_finding,
    trace_findings,
)
from lightning_gradstab.diagnosis.graph import ModelGraph
from lightning_gradstab.diagnosis.init_rules import InitScheme, init_findings, layer_fans
from lightning_gradstab.diagnosis.model_state import preserved_state
from lightning_gradstab.diagnosis.probe import run_probe
from lightning_gradstab.diagnosis.probe_results import LayerProbe, ProbeError, ProbeResult
from lightning_gradstab.diagnosis.signal_rules import activation_findings, delta_ratio, signal_findings_measured
from lightning_gradstab.report import Finding, Report


def diagnose(
    model: nn.Module,
    inputs: Tensor | tuple | list | Mapping[str, Any],
    *,
    loss_fn: Callable[[Any], Tensor] | None = None,
    seed: int = 0,
) -> Report:
    """Find the causes of vanishing/exploding gradients in ``model`` on one real batch, and name the fixes.

    Runs one forward and one backward (``torch.autograd.grad``: no ``.grad`` is written, no optimizer step) in
    training mode, as training would see the batch, then restores buffers, train/eval flags and the RNG.

    Args:
        model: any ``nn.Module``; a ``torch.compile``d module is probed on its eager ``_orig_mod`` (module
            hooks do not fire inside compiled graphs), so nothing is recompiled.
        inputs: the batch: a tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or a mapping, passed
            as keyword arguments (``model(**inputs)``, Hugging Face style) when ``forward`` accepts its keys,
            else as one argument (``model(inputs)``, a ``forward(batch_dict)``).
        loss_fn: maps the model output to a scalar loss; by default a random unit-variance direction on
            the output is backpropagated, so no labels are needed.
        seed: seed of that random direction.

    When the model runs on ``inputs`` but the probe cannot measure it, the report holds a ``trace.incomplete``
    finding naming the cause (``could_not_probe(report)`` is then True) instead of an exception.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``inputs`` is not a tensor/sequence/mapping, or
            ``loss_fn`` is not callable.
        ProbeError: (a ``ValueError``) the model's own forward or backward raises on ``inputs`` (e.g. wrong
            shapes), with the model's error as the cause.
        ValueError: ``loss_fn`` does not return a scalar tensor.

    Example::

        report = diagnose(model, torch.randn(32, 64))
        report.print()
        assert "init.scale" not in report.codes
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, (Tensor, tuple, list, Mapping)):
        raise TypeError(
            f"`inputs` must be a tensor, a tuple/list of positional arguments or a mapping of keyword "
            f"arguments, got {type(inputs).__name__}"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable or None, got {type(loss_fn).__name__}")

    model = eager_module(model)

    def forward(batch: Any) -> Any:
        return call_with_batch(model, batch)

    try:
        result = run_probe(model, forward, inputs=inputs, loss_fn=loss_fn, seed=seed)
    except ProbeError as error:
        cause = error.__cause__ or error
        if _runs_plainly(model, forward, inputs):  # the model is fine: the probe is what failed
            return probe_failed_report(type(model).__name__, "diagnose", f"{type(cause).__name__}: {cause}")
        raise ProbeError(
            f"`inputs` of shapes {_shapes(inputs)} do not fit {type(model).__name__}: its forward/backward "
            f"raised {type(cause).__name__}: {cause}"
        ) from cause
    return build_report(result, model=type(model).__name__, source="diagnose")


def _runs_plainly(model: nn.Module, forward: Callable[[Any], Any], inputs: Any) -> bool:
    """Whether the model's forward runs on ``inputs`` without the probe (state restored afterwards)."""
    try:
        with preserved_state(model), torch.no_grad():
            model.train()
            forward(inputs)
    except Exception:
        return False
    return True


def probe_failed_report(model: str, source: str, cause: str) -> Report:
    """The report of a model that could not be probed: one ``trace.incomplete`` finding naming the real cause
    (``evidence["probe_failed"]`` is True, which :func:`could_not_probe` reads)."""
    finding = Finding(
        "trace.incomplete",
        "info",
        (),
        {"problem": f"the probe failed: {cause}", "probe_failed": True},
        f"Could not diagnose the model (the probe failed: {cause}); nothing was measured. Call "
        "`diagnose(model, batch)` on the eager module, or report the model to lightning_gradstab.",
    )
    return Report([finding], model=model, source=source)


def call_with_batch(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch the way its ``forward`` takes it.

    A tensor is one argument, a tuple/list positional arguments; a mapping is passed as keyword arguments
    when ``forward`` accepts every key (or takes ``**kwargs``), and as one argument otherwise.

    Example::

        call_with_batch(bert, {"input_ids": ids, "attention_mask": mask})  # bert(**batch)
        call_with_batch(net, {"image": x, "label": y})                      # net(batch)
    """
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch) if _takes_keywords(model, batch) else model(batch)
    return model(*batch)


def _takes_keywords(model: nn.Module, batch: Mapping[str, Any]) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return True
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return all(isinstance(key, str) and key in names for key in batch)


def build_report(
    result: ProbeResult, *, model: str, source: str, extra: list[Finding] | None = None
) -> Report:
    """Apply every rule to a probe result and assemble the :class:`Report` (shared by the callbacks).

    Example::

        report = build_report(run_probe(model, lambda batch: model(batch), inputs=x), model="MLP", source="diagnose")
    """
    graph = result.graph
    first_calls: dict[str, float] = {}
    for probe in sorted(result.layers, key=lambda p: p.node):
        first_calls.setdefault(probe.name, probe.output_std)
    findings, schemes, weight_std = init_findings(
        graph, first_calls, result.weight_moments, result.gradient_rows, result.vector_weights,
        {probe.node: probe.output_std for probe in result.joins},
    )
    scales = [f for f in findings if f.code == "init.scale"]
    activation_problems = activation_findings(result.activations)
    measured = delta_ratio(result)
    symmetric = [f for f in findings if f.code == "init.symmetric" and f.severity != "info"]
    sigmoid = activation_finding(graph)
    cause, init_explains = _signal_cause(graph, scales, symmetric, activation_problems + sigmoid, measured)
    signal = [_deliberate(f, graph) for f in signal_findings_measured(result, cause, measured)]
    unexplained = [f for f in signal if not init_explains] + activation_problems + sigmoid
    findings += signal + activation_problems + sigmoid
    findings += normalization_finding(graph, [f for f in unexplained if f.code != "activation.dead"])
    findings += residual_finding(graph)
    findings += recurrent_findings(graph)
    findings += trace_findings(graph)
    findings += extra or []
    activations = [
        {"name": a.name, "op": a.op, "hidden": a.hidden, "dead_fraction": a.dead_fraction,
         "saturated_fraction": a.saturated_fraction}
        for a in result.activations
    ]
    report = Report(findings, layer_rows(result, schemes, weight_std), activations, model=model, source=source)
    if result.factored_out:
        report.notes.append(
            f"{', '.join(result.factored_out)}: zero-initialised output layer (deliberate: every upstream gradient "
            "is exactly 0 at step 0); the signal was measured from its input instead."
        )
    return report


NORM_GAIN_SMALL = 10**-0.5
"""A normalization gain (RMS of its output at init) below 1/sqrt(10) shrinks the variance more than 10x."""


def _listed(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}, …, {names[-1]} ({len(names)} normalizations)"


def _deliberate(finding: Finding, graph: ModelGraph) -> Finding:
    """``signal.vanishing`` explained by deliberately down-scaled residual branches becomes info.

    With LayerScale (Touvron et al. 2021) a branch's output is multiplied by ``gamma`` (1e-6..1e-1) at init, so
    whatever reaches the output only through branches (patch tokens read by a class token) gets ~``gamma``
    of the gradient per branch crossed, on purpose: it grows as ``gamma`` learns. Explained when the measured
    ratio is no smaller than ``gamma ** 2`` (two branch crossings: into a token and out of it).
    """
    scales = [layer.downstream_scale for layer in graph.layers if layer.in_branch and 0 < layer.downstream_scale < 1]
    ratio = finding.evidence.get("delta_rms_first_over_last", 1.0)
    if finding.code != "signal.vanishing" or not scales or ratio < min(scales) ** 2:
        return finding
    return dataclasses.replace(
        finding,
        severity="info",
        evidence={**finding.evidence, "branch_scale_min": min(scales)},
        recommendation=(
            f"Expected at init: residual branches are scaled down by as little as {min(scales):.1e} (LayerScale, "
            "Touvron et al. 2021), so what reaches the output only through them gets a small gradient until the "
            "scales learn; nothing to fix."
        ),
    )


def _signal_cause(
    graph: ModelGraph,
    scales: list[Finding],
    symmetric: list[Finding],
    activation_problems: list[Finding],
    measured: tuple[float, Any] | None,
) -> tuple[str, bool]:
    """The recommendation of a signal finding: the cause the evidence supports, and whether that cause is
    identified (the init, symmetric or dead units, normalization gains: no architecture advice is due then).

    The causes are tried in order: first those in the weights at init, then those in the activations and the
    architecture. When the init does not explain the measurement, the text says so before naming the other cause.
    """
    if measured is None:
        return "", False
    ratio = measured[0]
    init_cause = _init_cause(graph, scales, symmetric, ratio)
    if init_cause is not None:
        return init_cause, True
    prefix = ""
    if scales:
        predicted = scales[0].evidence["predicted_signal_factor"]
        prefix = f"The init alone predicts {predicted:.1e}, not the measured {ratio:.1e}: "
    text, identified = _structural_cause(graph, activation_problems, ratio)
    return prefix + text, identified


def _init_cause(graph: ModelGraph, scales: list[Finding], symmetric: list[Finding], ratio: float) -> str | None:
    """The recommendation when the weights at init explain a measured first/last delta ratio, else None:
    symmetric weights, an init scale, or normalization gains far below 1.

    An init scale explains the measurement only if its predicted factor points the same way and is of the same
    order (log of one within a factor 2 of the log of the other); otherwise the measurement has another cause,
    and the text must name it instead of sending the user to re-initialise.
    """
    vanishing = ratio < 1.0
    if symmetric and vanishing:
        names = ", ".join(m for f in symmetric for m in f.modules)
        return f"Re-initialise {names} randomly first (see init.symmetric): its constant weights block the signal."
    for scale in scales:
        predicted = scale.evidence["predicted_signal_factor"]
        if ratio > 0 and (predicted < 1.0) == vanishing and 0.5 <= math.log(ratio) / math.log(predicted) <= 2.0:
            return (
                f"Fix the initialization first (see init.scale: {scale.recommendation.split(' (e.g.')[0]}); "
                f"its predicted signal factor {predicted:.1e} matches this measurement ({ratio:.1e})."
            )
    small_gains = sorted(name for name, gain in graph.norm_gains.items() if gain < NORM_GAIN_SMALL)
    if vanishing and len(small_gains) >= 2:
        return (
            f"Re-initialise the gains (weight) of {_listed(small_gains)} to 1 (`nn.init.ones_`): at ~"
            f"{min(graph.norm_gains[n] for n in small_gains):.0e} each normalization shrinks its output, the next "
            "one's input variance falls under its eps, and the shrinkage compounds layer after layer."
        )
    return None


def _structural_cause(graph: ModelGraph, activation_problems: list[Finding], ratio: float) -> tuple[str, bool]:
    """The recommendation when the init does not explain the measurement: saturated or dead units, a deep plain
    stack without normalization or without skips, or, failing all of them, the generic advice; and whether the
    cause is identified (only dead units are: reviving them needs no architecture advice)."""
    vanishing = ratio < 1.0
    codes = {f.code for f in activation_problems}
    if vanishing and codes & {"activation.saturated", "arch.activation"}:
        return (
            "saturated or sigmoid units pass at most 1/4 of the gradient per layer (Glorot & Bengio 2010): put a "
            "normalization layer before each of them, or use ReLU with He init (see arch.activation, "
            "activation.saturated)."
        ), False
    if vanishing and "activation.dead" in codes:
        return "dead ReLU units pass no gradient: revive them first (see activation.dead).", True
    if graph.plain_depth >= 4 and not graph.plain_chain_normalized:
        return (
            "add normalization layers to the deep plain stack (see arch.normalization) and check the activations."
        ), False
    if not vanishing and graph.plain_chain_normalized and graph.plain_depth >= PLAIN_DEPTH_RESIDUAL:
        see = " (see arch.residual)" if graph.plain_depth >= PLAIN_DEPTH_RESIDUAL_UNOBSERVED else ""
        return (
            f"a normalized plain stack of {graph.plain_depth} layers without skips amplifies gradients toward the "
            "input at init (Yang et al. 2019: about sqrt(pi/(pi-1)) ~ 1.2 per BatchNorm-ReLU layer): add identity "
            f"skip connections over it{see}, or warm the learning rate up."
        ), False
    if graph.plain_depth >= PLAIN_DEPTH_RESIDUAL_UNOBSERVED:
        return "add identity skip connections to the deep plain stack (see arch.residual).", False
    direction = "vanish" if vanishing else "explode"
    return (
        f"gradients {direction} toward the input for a reason neither the init nor the architecture rules explain: "
        "lower the learning rate or clip, and check the first layers."
    ), False


def layer_rows(
    result: ProbeResult, schemes: dict[str, InitScheme], weight_std: dict[str, float]
) -> list[dict[str, Any]]:
    """One row per parameterised layer with the documented per-layer JSON fields."""
    first_call: dict[str, LayerProbe] = {}
    for layer_probe in result.layers:
        first_call.setdefault(layer_probe.name, layer_probe)
    # growth of the delta from one layer to the one before it (toward the input); > 1 means it grows
    ordered = [p for p in sorted(first_call.values(), key=lambda p: p.node) if p.grad_rms]
    growth = {  # cast: ordered keeps only probes with a (non-zero) grad_rms
        earlier.name: cast(float, earlier.grad_rms) / cast(float, later.grad_rms)
        for earlier, later in pairwise(ordered)
    }
    rows = []
    for layer in result.graph.layers:
        weight = layer.weight
        fan_in, fan_out = layer_fans(layer) if weight is not None and weight.dim() >= 2 else (None, None)
        probe = first_call.get(layer.name)
        rows.append({
            "name": layer.name,
            "kind": layer.kind,
            "activation": layer.activation,
            "normalized": layer.normalized,
            "fan_in": fan_in,
            "fan_out": fan_out,
            "weight_std": weight_std.get(layer.name),
            "recommended_init": schemes[layer.name].name if layer.name in schemes else None,
            "recommended_std": schemes[layer.name].std if layer.name in schemes else None,
            "output_mean": probe.output_mean if probe else None,
            "output_std": probe.output_std if probe else None,
            "grad_rms": probe.grad_rms if probe else None,
            "delta_growth": growth.get(layer.name),
        })
    return rows


def _shapes(inputs: Any) -> str:
    if isinstance(inputs, Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, Mapping):
        return str({k: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for k, v in inputs.items()})
    return str([tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in inputs])
