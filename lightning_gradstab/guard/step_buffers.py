"""The buffers a forward pass writes, copied before each optimizer step so that a step the guard skips leaves no
trace in them.

Skipping a step drops its gradients but undoes nothing its forward pass did: BatchNorm's running statistics
and counter. :class:`StepBuffers` keeps device copies of exactly the buffers a forward writes (learned on the
first steps) and copies them back when the guard skips the step. A rollback restores them from its
:class:`~lightning_gradstab.guard.snapshot.RollbackSnapshot` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class StepBuffers:
    """The buffers a forward pass changes (BatchNorm's running statistics and counter), as they were before the
    current optimizer step, so a step the guard skips leaves no trace in them.

    Dropping a step's gradients undoes nothing the forward did: a NaN batch through ``BatchNorm`` makes its
    running mean and variance NaN, ``eval()`` then returns NaN while the weights are fine, and the next
    snapshot copies the NaN. :meth:`save` (before the step's first forward) copies the buffers the forward
    changes into device tensors of their own; :meth:`restore` (on a skipped step) copies them back. Which
    buffers change is learned once: every buffer is copied before the first step, and at the second
    :meth:`save` only those whose values or version counters changed stay tracked (one host read per fit;
    none at all are, for a model without running statistics: no cost). A buffer first written later is
    tracked from the next step on (its version counter). Copies are device-to-device.

    Example::

        buffers = StepBuffers()
        model = torch.nn.BatchNorm1d(4)
        buffers.save(model)
        model(torch.full((2, 4), float("nan")))  # a bad batch
        buffers.restore()
        assert torch.isfinite(model.running_mean).all()
    """

    def __init__(self) -> None:
        self._module: nn.Module | None = None
        self._buffers: list[Tensor] = []  # every buffer of the module, each once
        self._tracked: list[bool] = []  # copied at ``save``: every buffer until the first step shows which change
        self._narrowed = False
        self._versions: list[int] = []  # version counters when the copies were last in sync
        self._live: list[Tensor] = []  # the buffers copied at ``save`` ...
        self._copies: list[Tensor] = []  # ... and their copies

    @property
    def nbytes(self) -> int:
        """Device bytes the copies hold."""
        return sum(copy.nbytes for copy in self._copies)

    def save(self, module: nn.Module) -> None:
        """Copy the buffers a forward may change, before this optimizer step's first forward pass."""
        if module is not self._module:
            buffers = list({id(b): b for b in module.buffers()}.values())
            self._module, self._buffers, self._tracked, self._narrowed = module, buffers, [True] * len(buffers), False
        elif self._versions:  # learn which buffers the forward passes since the last save wrote to
            changed = [b._version != v for b, v in zip(self._buffers, self._versions, strict=True)]
            if not self._narrowed and self._live:
                # after the first step, by value too: kernels such as batch_norm's update their running
                # statistics without bumping the version counter. One host read, once per fit.
                differs = torch.stack([(c != b).any() for c, b in zip(self._copies, self._live, strict=True)])
                changed = [a or b for a, b in zip(changed, differs.tolist(), strict=True)]
            else:  # a buffer first written later is tracked from then on
                changed = [a or b for a, b in zip(self._tracked, changed, strict=True)]
            self._tracked, self._narrowed = changed, True
        live = [b for b, tracked in zip(self._buffers, self._tracked, strict=True) if tracked]
        if len(live) != len(self._live) or any(a is not b for a, b in zip(live, self._live, strict=True)):
            self._live, self._copies = live, [torch.empty_like(b) for b in live]
        if self._live:
            with torch.no_grad():
                torch._foreach_copy_(self._copies, self._live)
        self.resync()

    def resync(self) -> None:
        """Take the buffers as they are now as unchanged by a forward (after the guard itself wrote them: a
        restore, a rollback), so a write of the guard's is not learned as one of the forward's."""
        self._versions = [b._version for b in self._buffers]

    def restore(self) -> None:
        """Copy the saved buffers back (a skipped step). Nothing happens before the first :meth:`save`."""
        if self._live:
            with torch.no_grad():
                torch._foreach_copy_(self._live, self._copies)
            self.resync()

    def clear(self) -> None:
        """Forget the module and free the copies (the end of a fit)."""
        self.__init__()  # type: ignore[misc]

