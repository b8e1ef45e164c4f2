"""The learning-rate back-off and its ceiling: the multiplier the guard applies to the scheduled learning rate, how
it recovers, and the ceiling below the rate that failed, which it climbs past only after a long stretch without
another failure.

A back-off multiplies the scale by ``backoff_factor``; each healthy step undoes a ``lr_recovery_steps``-th of one
factor, up to the ceiling. The ceiling is the scale a back-off episode began at (a divergence's at once): that rate
failed. When the adapter reports the scheduled learning rate, the ceiling is kept as an absolute rate too, so a
schedule that decays below the rate that failed runs at its own rate again, and one that climbs above it is held.

The evidence that a rate failed describes the run as it was then. A ceiling that has held for a long stretch without
another failure is raised by one factor (the rate is tried again), and so on, one factor per stretch, up to the
configured rate: a transient instability does not cost the rest of a long run its learning rate. The stretch is
the guard's long horizon (``drift_horizon_steps``, 1000 steps by default); when the rate tried again fails within
it, the next stretch is twice as long (exponential back-off in time, as TCP retransmissions do), so a rate that
keeps failing is re-tried at most ``log2(steps / horizon)`` times over a run, each try ending in one more back-off.
Additive-increase / multiplicative-decrease on the same principle is what keeps TCP both safe and efficient (Chiu &
Jain 1989); the bold-driver heuristic adapts a learning rate the same way (Battiti 1989).
"""

from __future__ import annotations

from lightning_gradstab.guard.config import PolicyConfig
from lightning_gradstab.guard.policy_state import Counters

CEILING_HOLD_STEPS = 1000
"""How long a lowered ceiling holds before its rate is tried again when ``drift_horizon_steps`` is ``None``: that
option's default, the guard's long horizon."""

MAX_HOLD_FACTOR = 2**20
"""The longest hold, in long horizons: a rate that failed on every retry is, in effect, never tried again."""

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
        """Do not trust ``scale`` (at the scheduled rate ``lr``, when known) or above again, for a long stretch
        (twice the last one when the rate that failed had just been tried again)."""
        state = self.counters
        horizon = self.config.drift_horizon_steps or CEILING_HOLD_STEPS
        if state.lr_ceiling_raised_step is not None:  # the first failure since the ceiling was last raised
            failed_again = state.steps - state.lr_ceiling_raised_step < state.lr_ceiling_hold
            # the rate tried again failed within its stretch: the next stretch is twice as long; after a whole
            # stretch at the raised rate, this is a new failure, judged afresh
            longer = min(state.lr_ceiling_hold * 2, MAX_HOLD_FACTOR * horizon)
            state.lr_ceiling_hold = longer if failed_again else horizon
            state.lr_ceiling_raised_step = None
        elif not state.lr_ceiling_hold:
            state.lr_ceiling_hold = horizon
        state.lr_ceiling_lowered_step = state.steps
        state.lr_ceiling = min(state.lr_ceiling, scale)
        if lr is not None:
            absolute = scale * lr
            previous = state.lr_ceiling_absolute
            state.lr_ceiling_absolute = absolute if previous is None else min(previous, absolute)

    def recover(self, lr: float | None) -> None:
        """A healthy step: undo one back-off factor per ``lr_recovery_steps`` healthy steps, up to the ceiling,
        and raise a ceiling that has held for its stretch by one factor."""
        state, config = self.counters, self.config
        self._relax_ceiling()
        ceiling = self.ceiling(lr)
        if state.lr_scale < ceiling:  # undo one back-off factor per lr_recovery_steps healthy steps
            recovery = (1.0 / config.resolved("backoff_factor")) ** (1.0 / config.resolved("lr_recovery_steps"))
            state.lr_scale = min(ceiling, state.lr_scale * recovery)
        else:  # a schedule that climbs above the rate that failed is held at it
            state.lr_scale = ceiling

    def _relax_ceiling(self) -> None:
        """Raise the ceiling by one factor when it has held, without a failure, for its stretch since it was last
        lowered or raised."""
        state = self.counters
        if state.lr_ceiling >= 1.0 and state.lr_ceiling_absolute is None:
            return
        if not state.lr_ceiling_hold:  # a ceiling from a state saved before ceilings held a stretch: start it now
            state.lr_ceiling_hold = self.config.drift_horizon_steps or CEILING_HOLD_STEPS
            state.lr_ceiling_lowered_step = state.steps
            return
        last_move = max(state.lr_ceiling_lowered_step, state.lr_ceiling_raised_step or 0)  # lowered or raised
        if state.steps - last_move < state.lr_ceiling_hold:
            return
        factor = 1.0 / self.config.resolved("backoff_factor")
        state.lr_ceiling = min(1.0, state.lr_ceiling * factor)
        if state.lr_ceiling_absolute is not None:
            state.lr_ceiling_absolute *= factor
            if state.lr_ceiling >= 1.0:  # the configured rate again: the schedule is the user's once more
                state.lr_ceiling_absolute = None
        state.lr_ceiling_raised_step = state.steps
        state.count("lr_ceiling_raised")

    def at_once(self, lr: float | None) -> None:
        """A divergence: the step size is too large; back off now, and hold the diverging rate off for a stretch."""
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
        state.lr_ceiling_hold, state.lr_ceiling_lowered_step, state.lr_ceiling_raised_step = 0, 0, None
