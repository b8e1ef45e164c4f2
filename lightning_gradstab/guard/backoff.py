"""The learning-rate back-off and its ceiling: the multiplier the guard applies to the scheduled learning rate, how
it recovers, and the ceiling below the rate that failed that it never climbs past again.

A back-off multiplies the scale by ``backoff_factor``; each healthy step undoes a ``lr_recovery_steps``-th of one
factor, up to the ceiling. The ceiling is the scale a back-off episode began at (a divergence's at once): that rate
failed. When the adapter reports the scheduled learning rate, the ceiling is kept as an absolute rate too, so a
schedule that decays below the rate that failed runs at its own rate again, and one that climbs above it is held.
"""

from __future__ import annotations

from lightning_gradstab.guard.config import PolicyConfig
from lightning_gradstab.guard.policy_state import Counters

MIN_LR_SCALE = 2.0**-10
"""The floor of the learning-rate multiplier (about 1/1000 of the configured LR): a back-off that would go below it
stops the run with its reason instead, so the guard never freezes a run silently."""


class Backoff:
    """The learning-rate multiplier and its ceiling, kept in the policy's shared ``counters`` (``lr_scale``,
    ``lr_ceiling``, ``lr_ceiling_absolute``).

    Args:
        config: ``backoff_factor``, ``lr_recovery_steps`` and whether the ``lr_backoff`` rung is allowed.
        counters: the policy's counters, shared.
    """

    def __init__(self, config: PolicyConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters

    def ceiling(self, lr: float | None = None) -> float:
        """The largest learning-rate multiplier the evidence supports for a scheduled learning rate ``lr``."""
        state = self.counters
        if lr is not None and state.lr_ceiling_absolute is not None:
            return min(1.0, state.lr_ceiling_absolute / lr)
        return state.lr_ceiling

    def lower_ceiling(self, scale: float, lr: float | None) -> None:
        """Never trust ``scale`` (at the scheduled rate ``lr``, when known) or above again."""
        state = self.counters
        state.lr_ceiling = min(state.lr_ceiling, scale)
        if lr is not None:
            absolute = scale * lr
            previous = state.lr_ceiling_absolute
            state.lr_ceiling_absolute = absolute if previous is None else min(previous, absolute)

    def recover(self, lr: float | None) -> None:
        """A healthy step: undo one back-off factor per ``lr_recovery_steps`` healthy steps, up to the ceiling."""
        state, config = self.counters, self.config
        ceiling = self.ceiling(lr)
        if state.lr_scale < ceiling:  # undo one back-off factor per lr_recovery_steps healthy steps
            recovery = (1.0 / config.resolved("backoff_factor")) ** (1.0 / config.resolved("lr_recovery_steps"))
            state.lr_scale = min(ceiling, state.lr_scale * recovery)
        else:  # a schedule that climbs above the rate that failed is held at it
            state.lr_scale = ceiling

    def at_once(self, lr: float | None) -> None:
        """A divergence: the step size is too large; back off now, and never trust the diverging rate again."""
        state, config = self.counters, self.config
        if config.allows("lr_backoff"):
            state.lr_scale *= config.resolved("backoff_factor")
            self.lower_ceiling(state.lr_scale, lr)

    def step_down(self, lr: float | None, new_episode: bool) -> bool:
        """One back-off of the ``lr_backoff`` rung (``new_episode``: the ladder just climbed to it, so the scale
        it began at was too high); ``True`` when it would fall below :data:`MIN_LR_SCALE`: stop instead."""
        state = self.counters
        backed_off = state.lr_scale * self.config.resolved("backoff_factor")
        if backed_off < MIN_LR_SCALE:  # the floor: stop with the reason rather than freeze the run
            return True
        if new_episode:  # a new back-off episode: the scale it began at was too high
            self.lower_ceiling(backed_off, lr)
        state.lr_scale = backed_off
        return False

    def withdraw(self) -> None:
        """No back-off and no ceiling: the evidence that set them is withdrawn."""
        state = self.counters
        state.lr_scale, state.lr_ceiling, state.lr_ceiling_absolute = 1.0, 1.0, None
