"""Whether training lacks weight decay: weights that grow, with their gradients, while the loss does not improve.

Without weight decay nothing pulls the weights back, and the updates themselves grow them: a step orthogonal to
``w`` adds its squared length to ``||w||^2`` (van Laarhoven 2017, "L2 Regularization versus Batch and Weight
Normalization"). What that growth does depends on the layer:

- in a layer without normalization the function's scale grows with the weights: for a net of depth ``L`` the
  output scales up to ``prod_l ||w_l||`` and every layer's gradient with the norms of the others, so the weights
  and the gradient norm grow together. When the loss does not improve meanwhile, the growth is not fitting the
  data: it sharpens the logits on what the model cannot fit (noise) and raises the curvature, which is what an
  L2 penalty on the weights bounds (Krogh & Hertz 1992; Zhang et al. 2019, "Three Mechanisms of Weight Decay
  Regularization", on decay as regularization and as control of the effective learning rate).
- behind a normalization the loss does not depend on the scale of ``w``: the growth shrinks the effective
  learning rate as ``lr / ||w||^2`` and the gradient falls as ``1 / ||w||`` (van Laarhoven 2017; Hoffer et al.
  2018). Such runs train on a CPU-sized horizon as well as with decay (Arora et al. 2019, auto rate-tuning; tried
  on tiny BatchNorm nets up to lr 1000), so a falling gradient is no evidence here.

The rule therefore asks for all of: the weight matrices without decay grew at least ``WEIGHT_NORM_GROWTH``-fold
over the window, their gradient norm did not fall (it grew with them), and the loss stalled
(:func:`~lightning_gradstab.diagnosis.training_rules.loss_stall`). Growth is the robust trend of the log norm
(Theil-Sen: the median of the pairwise slopes, insensitive to a few outlying steps) over the sampled steps, not
the ratio of two single measurements. Layers whose optimizer group has a weight decay (AdamW's decoupled
``weight_decay``, SGD's or Adam's L2 ``weight_decay``) are decayed already and never count.

The fix named: AdamW's decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled Weight Decay
Regularization": under Adam an L2 term is divided by the gradient RMS and decays large-gradient weights least),
or SGD's ``weight_decay``; or a lower learning rate, which slows the growth as well (on the tiny noisy-label net of
the tests, decay and a 10x lower rate both beat the undecayed run, the lower rate more).

Pure functions over plain inputs, tested without a Trainer; ``ArchitectureAdvisor`` gathers per-layer weight and
gradient norms from the suite's shared per-step statistics every few steps.

Example::

    steps = range(12)
    weights = {"net.0.weight": [2.0 * 1.2**t for t in steps], "net.2.weight": [1.0 * 1.2**t for t in steps]}
    grads = {"net.0.weight": [0.1 * 1.1**t for t in steps], "net.2.weight": [0.1 * 1.1**t for t in steps]}
    evidence = weight_decay_evidence(weights, grads, [1.3] * 60, 0.1, {"net.0.weight": 0.0, "net.2.weight": 0.0})
    assert evidence is not None and evidence["weight_norm_growth"] > 2
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradstab.diagnosis.optimizer_rules import module_of
from lightning_gradstab.diagnosis.training_rules import loss_stall
from lightning_gradstab.report import Finding

WEIGHT_NORM_GROWTH = 2.0
"""Growth of the undecayed weight matrices' joint norm over the window from which it counts: the weights' scale
doubled. Through ``L`` un-normalized layers that can scale the output ``2^L``-fold; behind a normalization it
cuts the effective learning rate 4x. Healthy runs grow their weights too, but train meanwhile (the loss stall is
required as well)."""

MIN_WEIGHT_SAMPLES = 5
"""Sampled steps needed before a trend of the weight norm is judged (Theil-Sen needs a few pairs to be robust)."""


def parameter_weight_decay(
    optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, Tensor]]
) -> dict[str, float]:
    """Each named parameter's weight decay: its optimizer group's ``weight_decay`` (0.0 means none).

    Parameters the optimizer does not hold, and groups without a ``weight_decay`` entry (an optimizer that
    decays some other way, or not at all: unknown), are left out.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``, or ``named_parameters`` does not yield
            ``(name, tensor)`` pairs.

    Example::

        decay = parameter_weight_decay(torch.optim.AdamW(model.parameters()), model.named_parameters())
        assert decay["net.0.weight"] == 0.01  # AdamW's default decoupled decay
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    by_id: dict[int, float] = {}
    for group in optimizer.param_groups:
        decay = group.get("weight_decay")
        if isinstance(decay, (int, float)) and not isinstance(decay, bool):
            by_id.update({id(p): float(decay) for p in group["params"]})
    decays: dict[str, float] = {}
    for item in named_parameters:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor)):
            raise TypeError(f"`named_parameters` must yield (name, tensor) pairs, got {type(item).__name__}")
        name, parameter = item
        if id(parameter) in by_id:
            decays[name] = by_id[id(parameter)]
    return decays


def log_growth(values: Sequence[float]) -> float:
    """Robust growth factor of a positive series over its length: ``exp(s * (n - 1))`` where ``s`` is the
    Theil-Sen slope (median pairwise slope) of ``log(values)`` against the sample index. Non-finite and
    non-positive values are skipped; fewer than two left: ``nan``.

    Example::

        assert abs(log_growth([1.0, 2.0, 4.0, 1e6, 16.0]) - 16.0) < 1e-9  # one outlier does not move it
    """
    points = [(i, math.log(v)) for i, v in enumerate(values) if math.isfinite(v) and v > 0]
    slopes = sorted((b[1] - a[1]) / (b[0] - a[0]) for j, a in enumerate(points) for b in points[j + 1 :])
    if not slopes:
        return math.nan
    middle = len(slopes) // 2
    slope = slopes[middle] if len(slopes) % 2 else 0.5 * (slopes[middle - 1] + slopes[middle])
    return math.exp(slope * (len(values) - 1))


def weight_decay_evidence(
    weight_norms: Mapping[str, Sequence[float]],
    grad_norms: Mapping[str, Sequence[float]],
    losses: Sequence[float],
    stall_improvement: float,
    weight_decay: Mapping[str, float],
) -> dict[str, Any] | None:
    """Evidence for advising weight decay, or None when the evidence is not all there.

    Over the layers whose ``weight_decay`` is 0 (layers missing from it are unknown and skipped): the joint norm
    ``sqrt(sum ||w_l||^2)`` of ``weight_norms`` (per layer, per sampled step, aligned with ``grad_norms``) grew
    at least ``WEIGHT_NORM_GROWTH``-fold (:func:`log_growth`) over at least ``MIN_WEIGHT_SAMPLES`` samples, the
    joint gradient norm did not fall (growth >= 1), and the loss stalled (``loss_stall`` with
    ``stall_improvement``). The layers named are those that grew ``WEIGHT_NORM_GROWTH``-fold themselves, fastest
    first (the fastest one if none did alone).

    Raises:
        TypeError: ``weight_norms``, ``grad_norms`` or ``weight_decay`` is not a mapping.
        ValueError: ``stall_improvement`` is not in (0, 1), or a layer's weight and gradient series differ in length.

    Example::

        grown = {"a": [1.0, 1.5, 2.0, 3.0, 4.0, 5.0]}
        evidence = weight_decay_evidence(grown, {"a": [0.1] * 6}, [1.0] * 20, 0.1, {"a": 0.0})
        assert evidence["layers_grown"] == ["a"]
        assert weight_decay_evidence(grown, {"a": [0.1] * 6}, [1.0] * 20, 0.1, {"a": 0.05}) is None  # decayed
    """
    for argument, value in (("weight_norms", weight_norms), ("grad_norms", grad_norms), ("weight_decay", weight_decay)):
        if not isinstance(value, Mapping):
            raise TypeError(f"`{argument}` must map layer names to values, got {type(value).__name__}")
    if isinstance(stall_improvement, bool) or not isinstance(stall_improvement, (int, float)):
        raise ValueError(f"`stall_improvement` must be a float in (0, 1), got {stall_improvement!r}")
    if not 0.0 < stall_improvement < 1.0:
        raise ValueError(f"`stall_improvement` must be a float in (0, 1), got {stall_improvement!r}")
    layers = [name for name in weight_norms if weight_decay.get(name) == 0.0 and name in grad_norms]
    for name in layers:
        if len(weight_norms[name]) != len(grad_norms[name]):
            raise ValueError(
                f"`weight_norms` and `grad_norms` must hold one value per sampled step for each layer; {name!r} has "
                f"{len(weight_norms[name])} weight norms and {len(grad_norms[name])} gradient norms"
            )
    samples = min((len(weight_norms[name]) for name in layers), default=0)
    if samples < MIN_WEIGHT_SAMPLES:
        return None
    joint_weight = [math.sqrt(sum(weight_norms[name][t] ** 2 for name in layers)) for t in range(samples)]
    joint_grad = [math.sqrt(sum(grad_norms[name][t] ** 2 for name in layers)) for t in range(samples)]
    weight_growth, grad_growth = log_growth(joint_weight), log_growth(joint_grad)
    if not (weight_growth >= WEIGHT_NORM_GROWTH and grad_growth >= 1.0):
        return None
    stall = loss_stall(losses, stall_improvement)
    if stall is None:
        return None
    growth = {name: log_growth(weight_norms[name][:samples]) for name in layers}
    ranked = sorted((name for name in layers if math.isfinite(growth[name])), key=lambda n: -growth[n])
    grown = [name for name in ranked if growth[name] >= WEIGHT_NORM_GROWTH] or ranked[:1]
    return {
        **stall,
        "weight_norm_growth": weight_growth,
        "weight_norm_growth_threshold": WEIGHT_NORM_GROWTH,
        "grad_norm_growth": grad_growth,
        "weight_norm_first": joint_weight[0],
        "weight_norm_last": joint_weight[-1],
        "weight_samples": samples,
        "layers_without_decay": len(layers),
        "layers_grown": grown,
        "layer_growth": [growth[name] for name in grown],
    }


def weight_decay_recommendation(evidence: Mapping[str, Any]) -> str:
    """The advice for :func:`weight_decay_evidence`'s evidence: the growth, the stall, the fix, with citations.

    Example::

        grown = {"a": [1.0, 1.5, 2.0, 3.0, 4.0, 5.0]}
        evidence = weight_decay_evidence(grown, {"a": [0.1] * 6}, [1.0] * 20, 0.1, {"a": 0.0})
        assert "AdamW" in weight_decay_recommendation(evidence)
    """
    layers = evidence["layers_grown"]
    named = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
    return (
        f"Without weight decay the weight matrices grew {evidence['weight_norm_growth']:.1f}x over the window "
        f"(fastest: {named}) and their gradient norm {evidence['grad_norm_growth']:.1f}x with them, while the loss "
        f"moved {100 * evidence['relative_improvement']:.1f} % (stall below {100 * evidence['stall_threshold']:.0f} "
        "%): the weights' scale grows without fitting the data. Add weight decay (AdamW's decoupled weight_decay, "
        "e.g. 0.01-0.1, Loshchilov & Hutter 2019; or SGD's weight_decay, e.g. 5e-4) to bound it (van Laarhoven "
        "2017; Zhang et al. 2019), or lower the learning rate, which slows the growth too."
    )


def weight_decay_findings(
    weight_norms: Mapping[str, Sequence[float]],
    grad_norms: Mapping[str, Sequence[float]],
    losses: Sequence[float],
    stall_improvement: float,
    weight_decay: Mapping[str, float],
) -> list[Finding]:
    """``optimizer.weight_decay`` (warning) when :func:`weight_decay_evidence` holds, naming the modules of the
    layers that grew; else no finding.

    Raises:
        TypeError, ValueError: as :func:`weight_decay_evidence`.

    Example::

        grown = {"net.0.weight": [1.0, 1.5, 2.0, 3.0, 4.0, 5.0]}
        decay = {"net.0.weight": 0.0}
        [finding] = weight_decay_findings(grown, {"net.0.weight": [0.1] * 6}, [1.0] * 20, 0.1, decay)
        assert finding.code == "optimizer.weight_decay" and finding.modules == ("net.0",)
    """
    evidence = weight_decay_evidence(weight_norms, grad_norms, losses, stall_improvement, weight_decay)
    if evidence is None:
        return []
    modules = tuple(dict.fromkeys(module_of(name) for name in evidence["layers_grown"]))
    return [Finding("optimizer.weight_decay", "warning", modules, evidence, weight_decay_recommendation(evidence))]
