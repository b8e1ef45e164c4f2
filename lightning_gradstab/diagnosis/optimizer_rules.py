"""Whether the optimizer, not the model, holds training back: evidence for advising an adaptive optimizer.

Under plain SGD every layer moves by ``lr * ||g_l||`` against a weight of norm ``||w_l||``, so its relative step
is ``lr * ||g_l|| / ||w_l||``. When these gradient-to-weight ratios span orders of magnitude across layers, one
global learning rate cannot suit them all: small enough for the fastest layer, it leaves the slowest one where
it started. You et al. 2017 (LARS, "Large Batch Training of Convolutional Networks") measured such spreads
between the layers of AlexNet and fixed them with a per-layer rate proportional to ``||w_l|| / ||g_l||``; an
adaptive optimizer (Adam, Kingma & Ba 2015; RMSProp, Tieleman & Hinton 2012) divides each coordinate's step by
the running RMS of its own gradient, which removes the spread without a per-layer rate. A spread alone is no
problem (a healthy run can train with it), so the advice also needs the loss to stall.

Pure functions over plain inputs (an optimizer, per-layer ratios over steps, losses), tested without a Trainer;
``ArchitectureAdvisor`` gathers the ratios from the suite's shared per-step statistics and publishes
:func:`adaptive_optimizer_findings`.

Example::

    ratios = {"net.0.weight": [1e-5] * 20, "net.2.weight": [1e-4] * 20, "net.4.weight": [1e-2] * 20}
    evidence = adaptive_optimizer_evidence(optimizer, ratios, [2.3] * 20, stall_improvement=0.1)
    assert evidence is not None and evidence["fastest_layer"] == "net.4.weight"
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradstab.diagnosis.training_rules import MIN_GRADIENT_LAYERS, loss_stall
from lightning_gradstab.report import Finding

GRAD_TO_WEIGHT_SPREAD = 100.0
"""Largest over smallest per-layer median ``||g|| / ||w||`` from which one learning rate cannot serve every layer:
two orders of magnitude, so the slowest layer's relative step is at most 1 % of the fastest one's (a learning rate
the fastest layer tolerates moves the slowest by 100x less)."""


SPREAD_EXPLAINED_BY = ("signal.vanishing", "signal.exploding")
"""Findings that explain a gradient-to-weight spread by the model, not the optimizer: gradients that vanish or
explode through depth (or a guard that met explosions) spread the layers' ratios too, and have their own fix."""


def grad_to_weight_ratios(named_parameters: Iterable[tuple[str, Tensor]]) -> dict[str, float]:
    """``||grad|| / ||weight||`` of every weight matrix or kernel (2 or more dimensions) with a gradient, keyed by
    parameter name, read back with one host sync.

    Biases and normalization gains are left out: a bias starts at 0, so its ratio says nothing about the step
    a learning rate makes relative to the weight.

    Raises:
        TypeError: ``named_parameters`` does not yield ``(name, tensor)`` pairs.

    Example::

        ratios = grad_to_weight_ratios(model.named_parameters())  # after backward: {"net.0.weight": 0.03, ...}
        assert set(ratios) == {"net.0.weight", "net.2.weight"}
    """
    names: list[str] = []
    norms: list[Tensor] = []
    for item in named_parameters:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor)):
            raise TypeError(f"`named_parameters` must yield (name, tensor) pairs, got {type(item).__name__}")
        name, parameter = item
        if parameter.dim() < 2 or parameter.grad is None:
            continue
        names.append(name)
        norms += [parameter.grad.detach().float().norm(), parameter.detach().float().norm()]
    if not names:
        return {}
    device = norms[0].device
    values = torch.stack([n.to(device) for n in norms]).tolist()
    return {
        name: values[2 * i] / values[2 * i + 1]
        for i, name in enumerate(names)
        if values[2 * i + 1] > 0 and math.isfinite(values[2 * i])
    }


def is_plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` takes one global step size for every coordinate: ``torch.optim.SGD``, with or
    without momentum or Nesterov (momentum averages gradients; it does not rescale them per coordinate).

    Example::

        assert is_plain_sgd(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        assert not is_plain_sgd(torch.optim.Adam(model.parameters()))
    """
    return type(optimizer) is torch.optim.SGD


def adaptive_optimizer_evidence(
    optimizer: torch.optim.Optimizer,
    grad_to_weight: Mapping[str, Sequence[float]],
    losses: Sequence[float],
    stall_improvement: float,
) -> dict[str, Any] | None:
    """Evidence for advising an adaptive optimizer, or None when the evidence is not all there.

    All of: the optimizer is plain SGD; the per-layer medians of ``grad_to_weight`` (``||g|| / ||w||`` per step,
    from :func:`grad_to_weight_ratios`) over at least ``MIN_GRADIENT_LAYERS`` layers span at least
    ``GRAD_TO_WEIGHT_SPREAD``; and the loss stalled (:func:`~lightning_gradstab.diagnosis.training_rules.loss_stall`
    with ``stall_improvement``). An adaptive optimizer already in use, a spread one learning rate can serve, or a
    loss that improves: no advice.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer`` or ``grad_to_weight`` is not a mapping.
        ValueError: ``stall_improvement`` is not in (0, 1).

    Example::

        evidence = adaptive_optimizer_evidence(optimizer, {"a": [1e-5], "b": [1e-3], "c": [1e-2]}, [1.0] * 20, 0.1)
        assert round(evidence["grad_to_weight_spread"]) == 1000
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(grad_to_weight, Mapping):
        raise TypeError(
            f"`grad_to_weight` must map parameter names to per-step ratios, got {type(grad_to_weight).__name__}"
        )
    if isinstance(stall_improvement, bool) or not isinstance(stall_improvement, (int, float)):
        raise ValueError(f"`stall_improvement` must be a float in (0, 1), got {stall_improvement!r}")
    if not 0.0 < stall_improvement < 1.0:
        raise ValueError(f"`stall_improvement` must be a float in (0, 1), got {stall_improvement!r}")
    if not is_plain_sgd(optimizer):
        return None
    medians = {name: _median(values) for name, values in grad_to_weight.items()}
    medians = {name: value for name, value in medians.items() if math.isfinite(value) and value > 0}
    if len(medians) < MIN_GRADIENT_LAYERS:
        return None
    slowest, fastest = min(medians, key=medians.__getitem__), max(medians, key=medians.__getitem__)
    spread = medians[fastest] / medians[slowest]
    if spread < GRAD_TO_WEIGHT_SPREAD:
        return None
    stall = loss_stall(losses, stall_improvement)
    if stall is None:
        return None
    return {
        **stall,
        "optimizer": type(optimizer).__name__,
        "grad_to_weight_spread": spread,
        "grad_to_weight_spread_threshold": GRAD_TO_WEIGHT_SPREAD,
        "slowest_layer": slowest,
        "slowest_grad_to_weight": medians[slowest],
        "fastest_layer": fastest,
        "fastest_grad_to_weight": medians[fastest],
        "layers": len(medians),
    }


def adaptive_optimizer_recommendation(evidence: Mapping[str, Any]) -> str:
    """The advice for :func:`adaptive_optimizer_evidence`'s evidence: the two layers, the spread, the stall, the fix.

    Example::

        evidence = adaptive_optimizer_evidence(optimizer, {"a": [1e-5], "b": [1e-4], "c": [1e-2]}, [1.0] * 20, 0.1)
        assert "Adam" in adaptive_optimizer_recommendation(evidence)
    """
    return (
        f"Under plain SGD the gradient-to-weight ratio ||g||/||w|| of {evidence['fastest_layer']} is "
        f"{evidence['grad_to_weight_spread']:.0f}x that of {evidence['slowest_layer']} (median over the window) and "
        f"the loss moved {100 * evidence['relative_improvement']:.1f} % (stall below "
        f"{100 * evidence['stall_threshold']:.0f} %): one learning rate cannot move every layer. Switch to an "
        "adaptive optimizer, Adam/AdamW (Kingma & Ba 2015) or RMSProp, which scales each coordinate's step by its "
        "own gradient's running RMS, or give each layer its own rate proportional to ||w||/||g|| "
        "(LARS, You et al. 2017)."
    )


def adaptive_optimizer_findings(
    optimizer: torch.optim.Optimizer,
    grad_to_weight: Mapping[str, Sequence[float]],
    losses: Sequence[float],
    stall_improvement: float,
    other_findings: Sequence[Finding] = (),
) -> list[Finding]:
    """``optimizer.adaptive`` (warning) when :func:`adaptive_optimizer_evidence` holds, naming the modules of the
    fastest and the slowest layer (parameter names without their last part); else no finding.

    A spread that gradients vanishing or exploding through depth explain is no optimizer finding: when
    ``other_findings`` (the same window's) hold one of ``SPREAD_EXPLAINED_BY``, that finding names the structural
    cause (init, normalization, skips), and an adaptive optimizer would only hide its symptom. A warning, like the
    suite's other findings of a stalled loss that does not block training outright.

    Raises:
        TypeError, ValueError: as :func:`adaptive_optimizer_evidence`.

    Example::

        ratios = {"net.0.weight": [1e-5] * 20, "net.2.weight": [1e-4] * 20, "net.4.weight": [1e-2] * 20}
        [finding] = adaptive_optimizer_findings(optimizer, ratios, [2.3] * 20, stall_improvement=0.1)
        assert finding.code == "optimizer.adaptive" and finding.modules == ("net.4", "net.0")
    """
    evidence = adaptive_optimizer_evidence(optimizer, grad_to_weight, losses, stall_improvement)
    if evidence is None or any(f.code in SPREAD_EXPLAINED_BY for f in other_findings):
        return []
    modules = tuple(dict.fromkeys(module_of(evidence[key]) for key in ("fastest_layer", "slowest_layer")))
    return [Finding("optimizer.adaptive", "warning", modules, evidence, adaptive_optimizer_recommendation(evidence))]


def module_of(parameter_name: str) -> str:
    """The module that owns a parameter: its qualified name without the last part (``"net.0"`` for
    ``"net.0.weight"``; a top-level parameter is its own name).

    Example::

        assert module_of("encoder.layers.0.linear1.weight") == "encoder.layers.0.linear1"
    """
    return parameter_name.rpartition(".")[0] or parameter_name


def _median(values: Sequence[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    middle = len(finite) // 2
    return finite[middle] if len(finite) % 2 else 0.5 * (finite[middle - 1] + finite[middle])
