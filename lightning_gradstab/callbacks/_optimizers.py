"""What an optimizer's step does with the gradient it is given: the facts the guard's update rules need.

Plain SGD moves the weights by ``lr * g`` (and, through momentum, ``lr / (1 - momentum) * g`` in total), so a
step size per unit gradient exists and bounds the update; Adam and its relatives divide by a running RMS of the
gradient, so their step ignores the gradient's scale and a norm ceiling only re-weights steps.
"""

from __future__ import annotations

import torch


def sgd_step_size(optimizer: torch.optim.Optimizer) -> float | None:
    """``lr / (1 - momentum)`` (times ``1 - dampening``) of plain SGD, the largest over its param groups.

    A gradient ``g`` moves SGD's weights by ``lr * g`` now and, through the momentum buffer, by
    ``lr / (1 - momentum) * g`` in total. Other optimizers (Adam's step is normalised) get ``None``.
    """
    if type(optimizer) is not torch.optim.SGD:
        return None
    sizes = []
    for group in optimizer.param_groups:
        lr, momentum = group.get("lr"), float(group.get("momentum", 0.0))
        if not isinstance(lr, (int, float)) or not 0.0 <= momentum < 1.0:
            return None
        dampening = float(group.get("dampening", 0.0)) if momentum > 0 else 0.0
        sizes.append(lr * (1.0 - dampening) / (1.0 - momentum))
    return max(sizes) if sizes and max(sizes) > 0 else None


SCALE_INVARIANT_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "SparseAdam", "Adagrad", "RMSprop", "Adadelta",
                 "Adafactor")
    if hasattr(torch.optim, name)
)


def is_scale_invariant(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step ignores a constant scaling of the gradient (it normalises by its moments).

    torch's adaptive optimizers by type; others (LAMB, Lion, 8-bit and fused Adams from other libraries) by
    the ``betas`` of Adam-style moment estimates in their defaults.
    """
    return isinstance(optimizer, SCALE_INVARIANT_OPTIMIZERS) or "betas" in getattr(optimizer, "defaults", {})


def scheduled_lr(optimizer: torch.optim.Optimizer) -> float | None:
    """The first param group's learning rate as a Python number (``None`` for a tensor: reading it would sync)."""
    lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None
