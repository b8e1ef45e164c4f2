"""What :class:`~lightning_gradstab.ExplosionGuard` measures per optimizer step, agreed on by every rank.

The step's loss is summed on the device over its micro-batches (:class:`StepLoss`); the few numbers a decision
needs are reduced across ranks in one collective and read on the host once (:func:`observe`), so every rank
takes the same decision. Kept apart from ``guard.py`` because this is the guard's only collective per step and
its only device-to-host read: what must stay cheap and identical on every rank is in one place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from lightning_gradstab.callbacks._optimizers import is_scale_invariant, scheduled_lr
from lightning_gradstab.guard.detect import Observation
from lightning_gradstab.running import FLOAT32_MAX, RankReduction, ReduceKind
from lightning_gradstab.stats import GradientStats

# what every decision needs, and how each value combines across ranks: the largest norm and loss, whether any
# rank and whether every rank saw non-finite gradients, the weights' norm (identical on every rank) and the
# smallest loss scale; and whether every rank holds a rollback snapshot (a disk write can fail on one rank only)
_FIELDS: list[tuple[str, ReduceKind]] = [
    ("total_norm", "max"),
    ("nonfinite_count", "max"),
    ("nonfinite_count_everywhere", "min"),
    ("loss", "max_worst"),  # a non-finite loss (NaN, +-Inf) reads as FLOAT32_MAX: the worst
    ("weight_norm", "max"),
    ("snapshot_available", "min"),
    # the relative-update ceiling's outcome of the previous optimizer step (0 when it was not measured)
    ("update_bounded", "max"),
    ("update_ratio_max", "max"),
    # the weights were written since the last optimizer step from outside the optimizer, on some rank
    ("weights_changed", "max"),
]
_WITHOUT_SCALER = RankReduction(_FIELDS)
_WITH_SCALER = RankReduction([*_FIELDS, ("loss_scale", "min")])
_NO_LOSS = -FLOAT32_MAX  # stands for "this rank had no loss this step" in the max over ranks


class StepLoss:
    """The training loss of the coming optimizer step, summed over its backwards on the device (no sync).

    Lightning hands each loss over already divided by ``accumulate_grad_batches`` (so the sum is the step's
    mean) and, under fp16, multiplied by the GradScaler's scale, which is divided out here.

    Example::

        loss = StepLoss()
        loss.add(torch.tensor(0.5), scaler=None)
        loss.take()  # tensor(0.5000); None for the next step until a backward adds to it
    """

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._unmeasured = False  # a backward of this step had a non-scalar loss (backward with gradient=)

    def add(self, loss: torch.Tensor, scaler: Any) -> bool:
        """Add one backward's loss; ``False`` when it is not a scalar (this step's loss is then unknown)."""
        if loss.numel() != 1:  # manual_backward(losses, gradient=...): the step's scalar loss is not known
            self._unmeasured = True
            return False
        value = loss.detach().float().reshape(())
        if scaler is not None and scaler._scale is not None:
            value = value / scaler._scale
        self._sum = value if self._sum is None else self._sum + value
        return True

    def take(self) -> torch.Tensor | None:
        """This step's loss (``None``: none, or not a scalar), and start the next step's."""
        loss, unmeasured = self._sum, self._unmeasured
        self._sum, self._unmeasured = None, False
        return None if unmeasured else loss


class StepReading(NamedTuple):
    """What :func:`observe` read: the observation, whether every rank holds a usable rollback snapshot, the
    per-head attention logits (the largest on any rank), the previous step's relative-update outcome and whether
    some rank's weights were changed from outside the optimizer since the last step."""

    observation: Observation
    snapshot_everywhere: bool
    attention_logits: list[float]
    update_bounded: float
    update_ratio_max: float
    weights_changed: bool = False


def observe(
    stats: GradientStats,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor | None,
    weight_norm: torch.Tensor | float,
    snapshot_ready: bool,
    scaler: Any,
    *,
    distributed: bool,
    step_size: float | None,
    competing: bool,
    attention_logits: torch.Tensor | None = None,
    update_outcome: tuple[torch.Tensor | float, torch.Tensor | float] = (0.0, 0.0),
    weights_changed: bool = False,
) -> StepReading:
    """The step's :class:`Observation` from the numbers of every rank (one collective, one host read), with what
    else rides the same read (:class:`StepReading`).

    ``step_size``: plain SGD's step per unit gradient when the update-ratio rule is on (the weights' norm is
    then part of the observation); ``competing``: the fit's losses compete (a GAN), so no ceiling applies;
    ``attention_logits``: the QK-clip measurement of this step, if one is pending (every rank alike);
    ``update_outcome``: the relative-update ceiling's ``(tensors bounded, largest ratio)`` of the previous step;
    ``weights_changed``: this rank's weights were written since the last optimizer step from outside the optimizer.
    """
    values: dict[str, Any] = {
        "total_norm": stats.total_norm,
        "nonfinite_count": stats.nonfinite_count,
        "nonfinite_count_everywhere": stats.nonfinite_count,
        "loss": _NO_LOSS if loss is None else loss,
        "weight_norm": weight_norm,
        "snapshot_available": float(snapshot_ready),
        "update_bounded": update_outcome[0],
        "update_ratio_max": update_outcome[1],
        "weights_changed": float(weights_changed),
    }
    if scaler is not None:
        values["loss_scale"] = scaler._scale if scaler._scale is not None else scaler._init_scale
    reduction = _WITH_SCALER if scaler is not None else _WITHOUT_SCALER
    reduced, logits = reduction.reduce_with_vector(values, attention_logits, distributed=distributed)
    loss_value = reduced["loss"]
    observation = Observation(
        total_norm=reduced["total_norm"],
        # an Inf total from finite gradients (a float32 overflow of the sum of squares) cannot be clipped
        nonfinite=max(reduced["nonfinite_count"] > 0, reduced["total_norm"] >= FLOAT32_MAX, loss_value >= FLOAT32_MAX),
        loss_scale=reduced.get("loss_scale"),
        rank_local=reduced["nonfinite_count"] > 0 and reduced["nonfinite_count_everywhere"] == 0,
        loss=None if loss_value <= 0.5 * _NO_LOSS or loss_value >= FLOAT32_MAX else loss_value,
        weight_norm=reduced["weight_norm"] if step_size is not None else None,
        step_size=step_size,
        lr=scheduled_lr(optimizer),
        # max_norm="auto" is the ceiling of single-objective recipes (LMs, classifiers); adversarial games are
        # trained without one (DCGAN, StyleGAN), their gradient norm being part of the game's dynamics
        scale_invariant=is_scale_invariant(optimizer) and not competing,
        competing=competing,
    )
    return StepReading(
        observation, reduced["snapshot_available"] > 0, logits, reduced["update_bounded"], reduced["update_ratio_max"],
        reduced["weights_changed"] > 0,
    )


def clear_found_inf(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Tell the GradScaler this step did not overflow (its gradients are dropped by the guard instead).

    A rank-local fault may have set ``found_inf`` on one rank only; left alone, that rank would halve its loss
    scale while the others keep theirs, and every later step would be scaled differently per rank.
    """
    state = scaler._per_optimizer_states.get(id(optimizer), {})
    for found_inf in state.get("found_inf_per_device", {}).values():
        found_inf.zero_()
