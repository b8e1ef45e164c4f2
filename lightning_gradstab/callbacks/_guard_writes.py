"""Whether the weights were written between two optimizer steps by something other than the optimizer.

A user's code changes the weights on purpose: a layer reset (Nikishin et al. 2022 reset a network's last layers
every few thousand updates against the primacy bias), pruning, a rewind to earlier weights (Frankle et al. 2020),
a ``load_state_dict`` of other weights. Each makes the loss jump, and to the guard's statistics that jump looks like
damage: the first batches after a reset are loss spikes it would skip (the steps that retrain the reset layer), and
the smoothed loss's rise is a divergence it would roll back, to a snapshot taken *before* the change: the user's
reset undone, the learning rate backed off. A snapshot from before such a change belongs to another model.

PyTorch counts in-place writes to a tensor in its version counter (``Tensor._version``, what autograd checks a
saved tensor against): an optimizer step, ``reset_parameters()``, ``torch.nn.init``, ``load_state_dict`` and any
in-place operation under ``torch.no_grad()`` raise it. :class:`OutsideWrites` reads the counters of every weight an
optimizer updates right after each optimizer step (a step post-hook) and again before the next; a difference
is a write from outside the optimizer. The guard's own writes (a rollback, QK-clip, the relative-update ceiling)
are taken in with :meth:`OutsideWrites.resync` right after them. An optimizer that evaluates its closure several
times per step writes the weights between the evaluations (L-BFGS's line search, SAM's step uphill and back), and
Lightning runs ``on_before_optimizer_step`` after every evaluation: only the first evaluation of a step (a step
pre-hook tells when one begins) is checked, the later ones take the optimizer's writes in.

A weight can also be replaced without a write: ``p.data = other`` points the parameter at another storage (how
Lightning's ``ModelPruning(use_lottery_ticket_hypothesis=True)`` rewinds the weights). The counters do not see it,
the storage's address does: it is read beside the counter for every plain ``nn.Parameter`` (not for FSDP1's flat
parameters and DTensor shards, whose storage their strategy swaps by design). An in-place write through ``.data``
(``p.data.mul_(0.4)``) changes neither, and a change of buffers only (a pruning mask) writes no weight: the docs say
so.

The cost is two passes over the parameter list per optimizer step reading two integers per tensor (about 0.1 us
each): no device work, no host sync.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter
from typing import Any

import torch

_VERSION = attrgetter("_version")


class OutsideWrites:
    """The version counters of the weights the optimizers update, as the last optimizer step left them.

    Example::

        layer = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        writes = OutsideWrites()
        writes.watch([optimizer])
        layer(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        writes.changed()  # False: the optimizer's own write
        layer.reset_parameters()
        writes.changed()  # True
    """

    def __init__(self) -> None:
        self._parameters: list[torch.Tensor] = []
        self._addressed: list[torch.Tensor] = []  # the plain parameters, whose storage address is read too
        self._expected: tuple[int, int] | None = None
        self._hooks: list[Any] = []
        self._stepping = False  # inside an optimizer's step() (between its pre- and post-hook)
        self._evaluated = False  # ... and a check already ran in this step (a closure evaluated before)

    def watch(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Follow the weights of ``optimizers`` (each once, however many optimizers hold it) from now on."""
        self.close()
        unique: dict[int, torch.Tensor] = {}
        for optimizer in optimizers:
            raw = getattr(optimizer, "_optimizer", optimizer)  # Lightning's wrapper steps the optimizer it wraps
            for group in raw.param_groups:
                for parameter in group["params"]:
                    unique.setdefault(id(parameter), parameter)
            self._hooks.append(raw.register_step_pre_hook(lambda opt, args, kwargs: self._begin_step()))
            self._hooks.append(raw.register_step_post_hook(lambda opt, args, kwargs: self._end_step()))
        self._parameters = list(unique.values())
        self._addressed = [  # dense plain parameters: a sparse tensor has no single storage address
            parameter for parameter in self._parameters
            if type(parameter) is torch.nn.Parameter and parameter.layout == torch.strided
        ]
        self.resync()

    def _begin_step(self) -> None:
        self._stepping, self._evaluated = True, False

    def _end_step(self) -> None:
        self._stepping = False
        self.resync()

    def _total(self) -> tuple[int, int]:
        return sum(map(_VERSION, self._parameters)), sum(map(torch.Tensor.data_ptr, self._addressed))

    def resync(self) -> None:
        """Take the weights as they are now as the optimizers left them (after a step, or a write of the guard's)."""
        self._expected = self._total() if self._parameters else None

    def changed(self) -> bool:
        """Whether a weight was written in place since the last :meth:`resync`; the writes are taken in."""
        if self._expected is None:
            return False
        total = self._total()
        if self._stepping and self._evaluated:  # a later evaluation of the same step: the writes are the optimizer's
            self._expected = total
            return False
        self._evaluated = self._stepping
        changed, self._expected = total != self._expected, total
        return changed

    def close(self) -> None:
        """Remove the step hooks and forget the weights (the end of a fit)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._parameters, self._addressed, self._expected = [], [], None
        self._stepping = self._evaluated = False
