"""The guard's learning-rate back-off, applied to the optimizer for one step only.

:class:`~lightning_gradstab.ExplosionGuard` multiplies every param group's ``lr`` just before the optimizer
steps and puts the scheduled value back right after it (an optimizer step post-hook), so LR schedulers and
``LearningRateMonitor`` never see the scaled value and a checkpoint never holds it. Kept apart from ``guard.py``
because it is the one place the guard writes into the optimizer's param groups.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn


class StepLrScale:
    """Scale an optimizer's learning rates for its coming step and restore them when the step has run.

    Example::

        scale = StepLrScale()
        scale.apply(optimizer, 0.5)  # optimizer.step() runs at half the rate; its lr is back right after it
        scale.close()
    """

    def __init__(self) -> None:
        self._saved: dict[int, tuple[torch.optim.Optimizer, list[Any]]] = {}
        self._hooks: dict[int, Any] = {}

    def apply(self, optimizer: torch.optim.Optimizer, lr_scale: float) -> None:
        """Multiply every numeric ``lr`` of ``optimizer`` by ``lr_scale`` until its next step has run."""
        self._saved[id(optimizer)] = (optimizer, [group.get("lr") for group in optimizer.param_groups])
        for group in optimizer.param_groups:
            if isinstance(group.get("lr"), (int, float, torch.Tensor)):  # groups without one were warned about
                group["lr"] = group["lr"] * lr_scale
        if id(optimizer) not in self._hooks:
            self._hooks[id(optimizer)] = optimizer.register_step_post_hook(
                lambda opt, args, kwargs: self.restore(opt)
            )

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Put back the learning rates of a scaled step (a no-op when none is pending)."""
        saved = self._saved.pop(id(optimizer), None)
        if saved is not None:
            for group, lr in zip(saved[0].param_groups, saved[1], strict=True):
                if lr is not None:
                    group["lr"] = lr

    def close(self) -> None:
        """Restore every pending scale and remove the step hooks (end of fit)."""
        for optimizer, _ in list(self._saved.values()):
            self.restore(optimizer)
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()


def warn_without_lr(optimizers: list[Any]) -> None:
    """Warn about the optimizers with a param group whose ``lr`` is not a number: the back-off cannot scale it."""
    without_lr = [
        f"optimizer {index} ({type(getattr(optimizer, '_optimizer', optimizer)).__name__})"
        for index, optimizer in enumerate(optimizers)
        if any(not isinstance(group.get("lr"), (int, float, torch.Tensor)) for group in optimizer.param_groups)
    ]
    if without_lr:
        rank_zero_warn(
            f"ExplosionGuard: {', '.join(without_lr)} has param groups without a numeric 'lr', so the "
            "'lr_backoff' rung cannot scale its learning rate: there it skips steps only (rollback and stop "
            "still work). Pass max_rung='skip' to silence this, or use an optimizer with an 'lr'."
        )
