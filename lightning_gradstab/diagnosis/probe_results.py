"""What a probe returns (per-layer and per-activation measurements with the traced graph) and how it fails."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_gradstab.diagnosis.graph import ModelGraph


@dataclass
class LayerProbe:
    """Measurements at one call of a parameterised layer.

    Attributes:
        name: module name.
        kind: layer kind (``linear``, ``conv``...).
        node: index of the call in the graph's node list (execution order).
        output_mean, output_std: statistics of the layer output on the batch.
        grad_rms: root-mean-square of the gradient reaching the output (None if the backward never got there).
        weight_grad_norm: norm of the gradient of the layer's weight (None if frozen or unused).
    """

    name: str
    kind: str
    node: int
    output_mean: float = 0.0
    output_std: float = 0.0
    grad_rms: float | None = None
    weight_grad_norm: float | None = None


@dataclass
class ActivationProbe:
    """Measurements at one activation: dead ReLU units or saturated sigmoid/tanh units.

    Attributes:
        name: the activation module name, or ``"<layer> (F.<op>)"`` for functional activations.
        op: activation name (``relu``, ``tanh``...).
        hidden: its output reaches another parameterised layer (it is not the model's output head).
        dead_fraction: fraction of units that output exactly zero for every sample (ReLU/ReLU6 only).
        saturated_fraction: fraction of outputs in the flat tails (sigmoid/tanh families only).
        units: number of units the dead fraction is taken over.
        input_zero: the layer feeding it (through reshapes, dropout and normalizations) output exactly zero on the
            whole batch: its units are silent because no signal reaches them yet, not because their
            pre-activations are negative (see :func:`.signal_rules.activation_findings`).
    """

    name: str
    op: str
    hidden: bool
    dead_fraction: float | None = None
    saturated_fraction: float | None = None
    units: int = 1
    input_zero: bool = False


@dataclass
class ProbeResult:
    """Everything the rules read: the traced graph plus per-layer and per-activation measurements.

    Example::

        result = run_probe(model, lambda batch: model(batch), inputs=x)
        print(result.graph.plain_depth, [p.grad_rms for p in result.layers])
    """

    graph: ModelGraph
    layers: list[LayerProbe] = field(default_factory=list)
    activations: list[ActivationProbe] = field(default_factory=list)
    loss: float | None = None
    gradients_reached: bool = False
    joins: list[LayerProbe] = field(default_factory=list)
    """The same measurements at every skip connection's output (the residual stream), named ``join:<node>``."""
    factored_out: list[str] = field(default_factory=list)
    """Zero-initialised output layers whose effect was factored out: the random direction is applied to their
    input, since every gradient upstream of an all-zero head is exactly 0 at step 0 by construction."""
    weight_moments: dict[str, tuple[float, float]] | None = None
    """Per layer with a weight: ``(variance, row spread)`` of the weight, taken before the backward."""
    gradient_rows: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per layer whose weight rows are identical: the spread of its gradient's rows and the gradient's largest
    entry (:mod:`.symmetry`): whether the first step tells its units apart."""
    vector_weights: set[str] = field(default_factory=set)
    """Layers whose weight is derived from a one-dimensional parameter: rows that are copies, not units."""


class ProbeError(ValueError):
    """The model could not be probed on the batch: its own forward (or backward) raised.

    A ``ValueError`` (the batch does not suit the model); the CLI exits with its "could not probe" status.
    """


def could_not_probe(report: Any) -> bool:
    """Whether ``report`` says the model ran but the probe could not measure it (a ``trace.incomplete`` finding
    whose evidence holds ``probe_failed``): the CLI's "could not probe" exit status.

    Example::

        if could_not_probe(diagnose(model, batch)):
            sys.exit(3)
    """
    return any(f.code == "trace.incomplete" and f.evidence.get("probe_failed") for f in report.findings)
