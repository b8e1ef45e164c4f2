"""Symmetric initialization: which layers start with identical units, and whether their gradients separate them.

Units with identical incoming weights compute the same function; gradient descent keeps them identical only when
they also *receive* identical gradients, which happens when nothing downstream tells them apart (the textbook
case: every unit of a layer with the same incoming and the same outgoing weights, Goodfellow et al. 2016, 8.4).
When the layer downstream weighs them differently (a random next layer, a router choosing among experts, gates
with their own biases) their gradient rows differ and the first step breaks the tie: a zero-initialised router,
gate or query is a deliberate start (Fedus et al. 2022; Bachlechner et al. 2020, ReZero), not a bug. So the probe
measures, for the layers whose rows are identical at init, whether the rows of their *gradient* are identical too:
that, not the weights alone, is what keeps the units identical forever.

Identical rows that are copies by construction are no evidence either: a weight broadcast with ``expand`` over
the batch (its memory is shared), or a one-dimensional parameter repeated once per sample (a pooling query). A
weight derived from a parameter (``W[i]``, a position table indexed per position) is judged by the gradient of
that parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gradstab.diagnosis.graph import LayerInfo, ModelGraph

SPREAD_COLUMNS = 256
"""Row spread (``init.symmetric``) is measured on the first 256 input columns of each weight: enough to tell
constant from random rows, and cheap on very wide layers."""

GRADIENT_TIE = 1e-6
"""Gradient rows whose spread is below this fraction of the gradient's largest entry are identical: float32
rounding of the same sums is ~1e-7 relative, so a tie broken only by rounding is still a tie."""


def rows(weight: Tensor) -> Tensor:
    """``weight`` as (units, inputs) over its first :data:`SPREAD_COLUMNS` inputs: a linear weight's rows, a
    convolution's output channels (the kernel flattened), a 3-D weight's leading axis."""
    flat = weight.reshape(weight.shape[0], -1)
    return flat[:, :SPREAD_COLUMNS] if flat.shape[1] > SPREAD_COLUMNS else flat


def broadcast(weight: Tensor) -> bool:
    """Whether ``weight`` repeats its values along an axis by construction (``expand``: a stride of 0)."""
    return any(stride == 0 and size > 1 for stride, size in zip(weight.stride(), weight.shape, strict=True))


def may_be_symmetric(layer: LayerInfo) -> bool:
    """Whether identical rows of ``layer``'s weight would matter: a hidden linear/conv layer with several units
    that feeds another layer (zero on purpose is fine where a layer ends a residual branch or is the output)."""
    weight = layer.weight
    return (
        weight is not None
        and layer.kind in ("linear", "conv", "other")
        and weight.dim() >= 2
        and weight.shape[0] >= 2
        and not layer.feeds_join
        and layer.feeds_layer
        and not broadcast(weight)
    )


def candidates(
    graph: ModelGraph, row_spread: dict[str, float], parameters: dict[str, Tensor]
) -> tuple[list[tuple[str, Tensor]], set[str]]:
    """The layers whose rows are identical and may matter, as ``(layer name, parameter)`` for the backward to
    differentiate, and the names of those whose weight is derived from a parameter of one dimension.

    A functional layer's weight may be derived from its parameter (``W[i]``, a table indexed by positions, a
    vector repeated per sample): its gradient is asked of the parameter it comes from (``parameters``: by name),
    and a weight derived from a vector has copies for rows, not units (a learned per-dimension scale repeated per
    sample), so it is no evidence either."""
    found: dict[str, Tensor] = {}
    vectors: set[str] = set()
    for layer in graph.layers:
        weight = layer.weight
        if weight is None or layer.name in found or row_spread.get(layer.name) != 0.0 or not may_be_symmetric(layer):
            continue
        base = weight if weight.is_leaf else parameters.get(layer.name)
        if base is not None and base.dim() < 2:
            vectors.add(layer.name)
        elif base is not None and base.requires_grad:
            found[layer.name] = base
    return list(found.items()), vectors


def gradient_row_statistics(gradient: Tensor) -> Tensor:
    """``[spread of the gradient's rows, largest |entry|]`` on the device, over the same columns as the weight's
    rows: the rows tie when the spread is at most :data:`GRADIENT_TIE` x the largest entry."""
    values = rows(gradient.detach().float())
    lowest, highest = values.aminmax(dim=0)
    return torch.stack([(highest - lowest).amax(), values.abs().amax()])


def gradient_ties(spread: float, scale: float) -> bool:
    """Whether gradient rows with this spread and largest entry are identical (see :data:`GRADIENT_TIE`)."""
    return spread <= GRADIENT_TIE * scale
