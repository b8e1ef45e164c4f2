"""``diagnose``: trace, probe and apply every rule to a model on one real batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import pairwise
from typing import Any

from torch import Tensor, nn

from lightning_gradstab.diagnosis.arch_rules import (
    activation_finding,
    normalization_finding,
    recurrent_findings,
    residual_finding,
    trace_findings,
)
from lightning_gradstab.diagnosis.graph import ModelGraph
from lightning_gradstab.diagnosis.init_rules import InitScheme, fans, init_findings
from lightning_gradstab.diagnosis.probe import ProbeResult, run_probe
from lightning_gradstab.diagnosis.signal_rules import activation_findings, delta_ratio, signal_findings
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
        model: any ``nn.Module``.
        inputs: the batch: a tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or a mapping of
            keyword arguments (``model(**inputs)``).
        loss_fn: maps the model output to a scalar loss; by default a random unit-variance direction on
            the output is backpropagated, so no labels are needed.
        seed: seed of that random direction.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``inputs`` is not a tensor/sequence/mapping, or
            ``loss_fn`` is not callable.
        ValueError: the forward or backward fails on ``inputs`` (e.g. wrong shapes), or ``loss_fn`` does not
            return a scalar tensor.

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

    def forward(batch: Any) -> Any:
        if isinstance(batch, Tensor):
            return model(batch)
        if isinstance(batch, Mapping):
            return model(**batch)
        return model(*batch)

    try:
        result = run_probe(model, forward, inputs=inputs, loss_fn=loss_fn, seed=seed)
    except (RuntimeError, IndexError) as error:
        raise ValueError(
            f"`inputs` of shapes {_shapes(inputs)} do not fit {type(model).__name__}: the forward/backward "
            f"raised {type(error).__name__}: {error}"
        ) from error
    return build_report(result, model=type(model).__name__, source="diagnose")


def build_report(
    result: ProbeResult, *, model: str, source: str, extra: list[Finding] | None = None
) -> Report:
    """Apply every rule to a probe result and assemble the :class:`Report` (shared by the callbacks).

    Example::

        report = build_report(run_probe(model, lambda batch: model(batch), inputs=x), model="MLP", source="diagnose")
    """
    graph = result.graph
    findings, schemes, weight_std = init_findings(graph)
    scale = next((f for f in findings if f.code == "init.scale"), None)
    activation_problems = activation_findings(result.activations)
    measured = delta_ratio(result.layers)
    vanishing = measured is not None and measured[0] < 1.0
    init_explains = scale is not None and (scale.evidence["predicted_signal_factor"] < 1.0) == vanishing
    symmetric = [f for f in findings if f.code == "init.symmetric"]
    signal = signal_findings(result, _signal_cause(graph, scale, symmetric, init_explains, vanishing))
    sigmoid = activation_finding(graph)
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
    return Report(findings, layer_rows(result, schemes, weight_std), activations, model=model, source=source)


def _signal_cause(
    graph: ModelGraph, scale: Finding | None, symmetric: list[Finding], init_explains: bool, vanishing: bool
) -> str:
    if symmetric and vanishing:
        names = ", ".join(m for f in symmetric for m in f.modules)
        return f"Re-initialise {names} randomly first (see init.symmetric): its constant weights block the signal."
    if init_explains and scale is not None:
        return (
            f"Fix the initialization first (see init.scale: {scale.recommendation.split(' (e.g.')[0]}); "
            "the predicted signal factor matches this measurement."
        )
    if graph.plain_depth >= 4 and not graph.plain_chain_normalized:
        return (
            "Add normalization layers to the deep plain stack (see arch.normalization) and check the activations."
        )
    if graph.plain_depth >= 20:
        return "Add identity skip connections to the deep plain stack (see arch.residual)."
    direction = "vanish" if vanishing else "explode"
    return (
        f"Gradients {direction} toward the input: lower the learning rate or clip, and check the init of the "
        "first layers."
    )


def layer_rows(
    result: ProbeResult, schemes: dict[str, InitScheme], weight_std: dict[str, float]
) -> list[dict[str, Any]]:
    """One row per parameterised layer with the documented per-layer JSON fields."""
    first_call = {}
    for probe in result.layers:
        first_call.setdefault(probe.name, probe)
    # growth of the delta from one layer to the one before it (toward the input); > 1 means it grows
    ordered = [p for p in sorted(first_call.values(), key=lambda p: p.node) if p.grad_rms]
    growth = {
        earlier.name: earlier.grad_rms / later.grad_rms for earlier, later in pairwise(ordered)
    }
    rows = []
    for layer in result.graph.layers:
        weight = layer.weight
        fan_in, fan_out = fans(weight) if weight is not None and weight.dim() >= 2 else (None, None)
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
