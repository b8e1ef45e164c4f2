"""A ceiling on how far one optimizer step may move a weight matrix relative to its scale.

Adam-family optimizers divide the step by a running RMS of the gradient, so each coordinate moves by about the
learning rate whatever the gradient's scale (exactly ``lr * sign(g)`` on the first step). Clipping the gradient
cannot shrink that step; at a learning rate too high for the weights' scale, or without the warm-up a post-LN
transformer needs (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"), every step
rewrites a large share of each matrix. What bounds it is the step measured against the weights:

    ratio_i = RMS(w_i^new - w_i^old) / max(RMS(w_i^old), 1 / sqrt(fan_in_i))

for each weight matrix ``i`` (``fan_in`` = the product of its dimensions after the first, as ``torch.nn.init``
counts it for a linear or convolution weight); a matrix whose ratio exceeds ``max_relative_update`` has its step
shrunk to exactly that ratio, ``w_i = w_i^old + (max_relative_update / ratio_i) (w_i^new - w_i^old)``; the other
tensors keep their step bit for bit. This is Adafactor's relative step size (Shazeer & Stern 2018, "Adafactor:
Adaptive Learning Rates with Sublinear Memory Cost", section 8: the step of each tensor is ``max(eps2, RMS(w)) *
rho`` with ``rho <= 1e-2``) used as a ceiling instead of a target, the per-layer trust ratio of LARS and LAMB (You
et al. 2017, 2020), and the quantity Kosson et al. 2024 ("Analyzing & Reducing the Need for Learning Rate Warmup
in GPT Training") find that warm-up keeps small.

Why ``0.1``: ten times the relative step that Adafactor takes on every step and that LAMB's trust ratio targets
at usual learning rates. A step that changes a matrix by a tenth of its scale in one go is far above what these
recipes intend; it is not fitted to a task.

Why the scale is at least ``1 / sqrt(fan_in)``, the RMS of a variance-preserving init (LeCun et al. 1998; He et al.
2015 within sqrt(2)), rather than Adafactor's ``eps2 = 1e-3``: many models start their matrices far smaller on
purpose (GPT-2 and most Hugging Face models at std 0.02, zero-initialised residual branches and readouts) and
train well with Adam steps that are large against those weights while they grow. Measured against their own RMS,
a stable learning rate was slowed: on the ``wortsman2023`` sweep (a GPT at std 0.02, d=64) the best LR (0.01)
ended at 2.212 instead of clip 1.0's 2.145 (``benchmarks/results/wortsman2023-ceiling-adafactor-floor.md``), and
the sweep's LR sensitivity fell only because its best loss rose. Against the variance-preserving scale, no step of
a stable LR in that sweep is bounded.

Only tensors with at least two dimensions (matrices, convolution kernels, embedding tables) are bounded: a bias or
a normalization gain has no fan-in that sets its scale, is often initialised at 0 or 1 by convention, and LARS and
LAMB leave such parameters out of the layer adaptation for the same reason. ``floor=`` a number measures steps
against ``max(RMS(w), floor)`` instead (Adafactor's rule).

Everything stays on the device: one copy of the bounded tensors before the step, their norms and the step's
norms after it, and the shrink as ``foreach`` calls, with no host read; :meth:`RelativeUpdateCeiling.end`
returns the number of tensors bounded and the largest ratio as a device tensor for the caller to read when it
next syncs. Sharded tensors (FSDP2/HSDP/tensor-parallel DTensors) are measured whole: local squared norms are
divided by their replica counts and summed in one ``all_reduce``, so every rank bounds the same tensors by the same
factors (every rank must call :meth:`~RelativeUpdateCeiling.end` on the same steps).

Example::

    ceiling = RelativeUpdateCeiling()
    ceiling.begin([p for p in model.parameters() if p.grad is not None])
    optimizer.step()
    outcome = ceiling.end()  # tensor([tensors bounded, largest ratio]) on the device
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_gradstab.arguments import check_positive
from lightning_gradstab.distributed import ReplicaCounts, is_dtensor, local_values, sum_over_ranks, world_size

DEFAULT_MAX_RELATIVE_UPDATE = 0.1


class RelativeUpdateCeiling:
    """Bound each weight matrix's step to ``max_relative_update`` times its scale, ``max(RMS(w), floor)`` (see the
    module docstring).

    Args:
        max_relative_update: the largest ``RMS(step) / max(RMS(weights), floor)`` of one step, > 0.
        floor: the weight RMS a step is measured against when the weights are smaller: ``"fan_in"`` (default,
            ``1 / sqrt(fan_in)``, a variance-preserving init's RMS) or a number > 0 (Adafactor's ``eps2`` is 1e-3).

    Example::

        ceiling = RelativeUpdateCeiling(max_relative_update=0.1)
        ceiling.begin(list(model.parameters()))  # before optimizer.step()
        optimizer.step()
        bounded, largest = ceiling.end().tolist()  # a host read, when the caller syncs anyway
    """

    def __init__(
        self, max_relative_update: float = DEFAULT_MAX_RELATIVE_UPDATE, floor: float | Literal["fan_in"] = "fan_in"
    ) -> None:
        self.max_relative_update = check_positive(max_relative_update, "max_relative_update")
        if isinstance(floor, str) and floor != "fan_in":
            raise ValueError(f"`floor` must be 'fan_in' or a number > 0, got {floor!r}")
        self.floor: float | Literal["fan_in"] = "fan_in" if floor == "fan_in" else check_positive(floor, "floor")
        self._tensors: list[Tensor] = []
        self._before: list[Tensor] = []
        self._sample_every = 1
        self._counts = ReplicaCounts(world_size())
        self._floor_cache: dict[tuple, Tensor] = {}

    @staticmethod
    def bounded(parameter: Tensor) -> bool:
        """Whether the ceiling applies to ``parameter``: a floating or complex tensor of at least two dimensions."""
        return parameter.ndim >= 2 and (parameter.is_floating_point() or parameter.is_complex())

    @property
    def pending(self) -> bool:
        """Whether :meth:`begin` has copied tensors that :meth:`end` has not measured yet."""
        return bool(self._tensors)

    @torch.no_grad()
    def begin(self, parameters: Sequence[Tensor], sample_every: int = 1) -> None:
        """Remember the values of the bounded ``parameters`` before the optimizer steps (one fused copy).

        ``sample_every`` > 1 makes the coming :meth:`end` a check only: it copies and measures every
        ``sample_every``-th row of each matrix (its first dimension; a shard's own rows), estimates the ratios from
        them and bounds nothing, for a caller that checks a run far below the ceiling at a fraction of the cost
        (and of the memory) and measures in full from the next step when the estimate comes near it."""
        if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
            raise ValueError(f"`sample_every` must be an int >= 1, got {sample_every!r}")
        self._tensors = [p for p in parameters if self.bounded(p)]
        self._sample_every = sample_every
        locals_ = [self._rows(p) for p in self._tensors]
        self._before = list(torch._foreach_mul(locals_, 1.0)) if locals_ else []

    def _rows(self, tensor: Tensor) -> Tensor:
        """The values of ``tensor`` that are measured: this rank's, every ``sample_every``-th row (a view)."""
        local = _local(tensor)
        return local if self._sample_every == 1 else local[:: self._sample_every]

    def drop(self) -> None:
        """Forget the copies (the step did not run, e.g. a GradScaler skipped it)."""
        self._tensors, self._before = [], []

    @torch.no_grad()
    def end(self) -> Tensor | None:
        """Shrink the steps above the ceiling in place; ``tensor([bounded, largest ratio])`` (float32, on the
        tensors' device) or ``None`` when :meth:`begin` copied nothing. A non-finite step is not bounded and not
        counted: its tensor stays non-finite (an infinite entry may read as NaN), for the guard's non-finite rule
        to meet at the next step."""
        tensors, before, checking = self._tensors, self._before, self._sample_every > 1
        self.drop()
        if not tensors:
            return None
        after = [self._rows(p) for p in tensors]
        weight_norms = torch._foreach_norm(before)
        torch._foreach_sub_(before, after)  # before := w_old - w_new, the step reversed
        step_norms = torch._foreach_norm(before)
        floor_sq = self._floor_squares(before, tensors, weight_norms[0].device)
        squares = torch.cat([torch.stack([n.float() for n in (*weight_norms, *step_norms)]).square(), floor_sq])
        if any(is_dtensor(p) for p in tensors):  # whole-tensor sums of shards: one collective, every rank alike
            _, placements, meshes = local_values(tensors)
            counts = self._counts.of(tensors, placements, meshes, squares.device, torch.float32)
            squares = sum_over_ranks(squares, torch.cat([counts, counts, counts]))
        weight_sq, step_sq, floor_sq = squares.split(len(tensors))
        ratio = step_sq.sqrt() / torch.maximum(weight_sq, floor_sq).sqrt()
        finite = torch.where(ratio.isfinite(), ratio, torch.zeros_like(ratio))
        if checking:  # an estimate from sampled rows: nothing is bounded
            return torch.stack([torch.zeros((), device=ratio.device), finite.max()])
        over = ratio.isfinite() & (ratio > self.max_relative_update)
        # keep the fraction (1 - ceiling / ratio) of the reversed step; 0 (no change) where a tensor is not over
        give_back = torch.where(over, 1.0 - self.max_relative_update / ratio, torch.zeros_like(ratio))
        torch._foreach_mul_(before, [k.to(b.dtype) if not b.is_complex() else k for k, b in
                                     zip(give_back.unbind(), before, strict=True)])
        torch._foreach_add_(after, before)
        return torch.stack([over.sum().float(), finite.max()])


    def _floor_squares(self, measured: list[Tensor], tensors: list[Tensor], device: torch.device) -> Tensor:
        """The floor's squared norm over the measured values (their count times ``1/fan_in``: the rows, when
        whole), cached per layout: a vector built from a Python list is a host-to-device copy, which on an
        accelerator waits for the work queued before it; the steady state copies nothing."""
        layout = tuple((b.numel(), tuple(p.shape)) for b, p in zip(measured, tensors, strict=True))
        key = (device, self._sample_every, layout)
        if key not in self._floor_cache:
            per_value = [1.0 / math.prod(p.shape[1:]) if self.floor == "fan_in" else float(self.floor) ** 2
                         for p in tensors]
            values = [b.numel() * v for b, v in zip(measured, per_value, strict=True)]
            self._floor_cache[key] = torch.tensor(values, dtype=torch.float32, device=device)
        return self._floor_cache[key]


def _local(tensor: Tensor) -> Tensor:
    """The values this rank holds (a DTensor's local shard), detached."""
    return (tensor.to_local() if is_dtensor(tensor) else tensor).detach()  # type: ignore[attr-defined]
