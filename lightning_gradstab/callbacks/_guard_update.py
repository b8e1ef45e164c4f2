"""The guard's side of the relative-update ceiling: which steps are measured, the step hooks, the outcome.

:class:`~lightning_gradstab.update_ceiling.RelativeUpdateCeiling` is the rule; this decides when it runs, so that a
run far below the ceiling pays for it about once in :data:`UPDATE_CEILING_EVERY` steps. A measured step copies the
bounded weights before the optimizer steps and shrinks what went over the ceiling right after (an optimizer step
post-hook). Its outcome (tensors bounded, largest ratio) stays on the device and rides the guard's one reduction
of the *next* step, so the ceiling adds no host read and every rank follows the same schedule.

A step is measured, and bounded where it goes over, when:

- it is the first of the fit for this optimizer;
- the last measured step came within half of the ceiling (or went over it): the next may go over;
- the learning rate rose since the last measurement by enough to bring it within half of the ceiling: an Adam
  step is proportional to the learning rate, so a warm-up or a restart moves the ratio with it.

Otherwise, every :data:`UPDATE_CEILING_EVERY` steps, a step is *checked*: every :data:`CHECK_ROWS_EVERY`-th row of
each matrix is copied and measured, and nothing is bounded. What such a check watches for is a slow drift of
Adam's step against the weights; a drift reaches half the ceiling before the ceiling, and from there every step is
measured in full. A check copies an eighth of the memory a full measurement copies, and costs less time
(``benchmarks/guard_overhead.py`` measures both).

Kept apart from ``guard.py`` because it is the one place the guard writes into the weights after the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lightning_gradstab.callbacks._optimizers import is_scale_invariant
from lightning_gradstab.update_ceiling import RelativeUpdateCeiling

UPDATE_CEILING_EVERY = 100
"""Optimizer steps between measurements of the relative update while the last one was below half the ceiling
and the learning rate has not risen: a measured step costs about ten passes over the weights, and what moves an
Adam step's size between them is the learning rate, which is watched every step."""

CHECK_ROWS_EVERY = 8
"""Rows of each matrix a periodic check copies and measures: one in this many."""

NEAR = 0.5  # a measured ratio above this share of the ceiling keeps the next step measured


@dataclass
class _Schedule:
    waited: int = 0  # optimizer steps since the last measurement
    ratio: float | None = None  # the largest ratio of the last measurement (None: not measured yet)
    lr: float | None = None  # the learning rate of the last measured step


class GuardUpdateCeiling:
    """Per optimizer: the ceiling, its schedule, the pending outcome and the step post-hook.

    Example::

        ceiling = GuardUpdateCeiling(0.1)
        outcome = ceiling.outcome(0)                 # for the reduction: [bounded, largest ratio] of the last step
        bounded = ceiling.read(0, 0.0, 0.0, lr=1e-3)  # the reduced values, read on the host with the step's others
        ceiling.begin(0, optimizer)                  # before optimizer.step(), on every rank alike
    """

    def __init__(self, max_relative_update: float, after_write: Callable[[], None] | None = None) -> None:
        self.max_relative_update = max_relative_update
        self._after_write = after_write  # told when the post-hook has written into the weights
        self._ceilings: dict[int, RelativeUpdateCeiling] = {}
        self._schedules: dict[int, _Schedule] = {}
        self._outcomes: dict[int, torch.Tensor] = {}
        self._hooks: dict[int, Any] = {}
        self._measuring: dict[int, int] = {}  # 0: not measured, 1: measured in full, CHECK_ROWS_EVERY: checked

    @staticmethod
    def applies_to(optimizer: torch.optim.Optimizer) -> bool:
        """Adam-family optimizers only: plain SGD's step is the gradient times the LR, which clipping bounds."""
        return is_scale_invariant(optimizer)

    def outcome(self, index: int) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The last measured step's ``(tensors bounded, largest ratio)``, device values for the reduction."""
        pending = self._outcomes.pop(index, None)
        if pending is None:
            return 0.0, 0.0
        return pending[0], pending[1]

    def read(self, index: int, bounded: float, largest: float, lr: float | None) -> int:
        """Take the reduced outcome of the last step and plan this one; returns how many tensors were bounded.

        ``largest`` is 0 when the last step was not measured. Every rank passes the same reduced values, so every
        rank measures the same steps (a sharded measurement enters a collective)."""
        schedule = self._schedules.setdefault(index, _Schedule())
        ceiling = self._ceilings.get(index)
        stepped = ceiling is None or not ceiling.pending
        if not stepped:  # copied, but the optimizer never stepped (a GradScaler overflow): measure again
            ceiling.drop()  # type: ignore[union-attr]
        if self._measuring.pop(index, 0) and stepped:
            schedule.ratio = largest
        schedule.waited += 1
        limit = NEAR * self.max_relative_update
        predicted = None
        if schedule.ratio is not None and lr is not None and schedule.lr is not None:
            # an Adam step is proportional to the learning rate; a rise from 0 (a warm-up's first step) is unbounded
            predicted = schedule.ratio * lr / schedule.lr if schedule.lr > 0 else (math.inf if lr > 0 else 0.0)
        if schedule.ratio is None or schedule.ratio > limit or (predicted is not None and predicted > limit):
            self._measuring[index] = 1
        elif schedule.waited >= UPDATE_CEILING_EVERY:
            self._measuring[index] = CHECK_ROWS_EVERY
        else:
            self._measuring[index] = 0
        if self._measuring[index]:
            schedule.waited, schedule.lr = 0, lr
        return int(bounded)

    def measuring(self, index: int) -> bool:
        """Whether this optimizer's last step was planned as a measured or checked one (its outcome is being read
        now)."""
        return bool(self._measuring.get(index, 0))

    def begin(self, index: int, optimizer: torch.optim.Optimizer) -> None:
        """Copy the weights the coming step may move (on a measured step) and make sure the post-hook is there."""
        sample_every = self._measuring.get(index, 0)
        if not sample_every:
            return
        ceiling = self._ceilings.setdefault(index, RelativeUpdateCeiling(self.max_relative_update))
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        ceiling.begin(parameters, sample_every=sample_every)
        if index not in self._hooks:
            self._hooks[index] = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._end(index))

    def skip(self, index: int) -> None:
        """The guard skips this step: nothing to measure (the schedule measures the next one instead)."""
        if self._measuring.get(index):
            self._measuring[index] = 0
            self._schedules[index].waited = UPDATE_CEILING_EVERY

    def _end(self, index: int) -> None:
        ceiling = self._ceilings.get(index)
        if ceiling is not None and ceiling.pending:
            outcome = ceiling.end()
            if outcome is not None:
                self._outcomes[index] = outcome
            if self._after_write is not None:
                self._after_write()

    def close(self) -> None:
        """Remove the step hooks and forget every copy, outcome and schedule (end of fit, or a new one)."""
        for handle in self._hooks.values():
            handle.remove()
        for ceiling in self._ceilings.values():
            ceiling.drop()
        self._hooks.clear()
        self._ceilings.clear()
        self._schedules.clear()
        self._outcomes.clear()
        self._measuring.clear()
