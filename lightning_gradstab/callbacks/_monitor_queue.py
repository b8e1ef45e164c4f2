"""The monitor's way of getting device scalars to the loggers without a host sync in the training step.

:class:`~lightning_gradstab.GradNormMonitor` queues each step's scalars as device tensors; every
``log_every_n_steps`` steps they are concatenated and copied to pinned host memory in one non-blocking
transfer (:class:`HostCopy`), and handed to the loggers once that copy has finished, at a later step or at
the end of training. Kept apart from ``monitor.py`` because it is the monitor's whole device-to-host path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradstab.callbacks._shared import log_metrics


@dataclass
class HostCopy:
    """Scalars of several steps on their way to the host, read once the copy has finished."""

    rows: list[tuple[int, Sequence[str]]]
    values: Tensor
    done: torch.cuda.Event | None

    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def metrics(self) -> list[tuple[int, dict[str, float]]]:
        if self.done is not None:
            self.done.synchronize()
        flat = self.values.tolist()
        out, offset = [], 0
        for step, names in self.rows:
            out.append((step, dict(zip(names, flat[offset : offset + len(names)], strict=True))))
            offset += len(names)
        return out


class ScalarQueue:
    """Device scalars per step, queued, copied to the host in batches and logged when the copy is done.

    Example::

        queue = ScalarQueue()
        queue.add(10, ("gradstab/grad_norm/total",), [torch.ones(1)])
        queue.start_copy()  # one asynchronous copy of everything queued
        queue.emit(trainer, wait=True)  # log it
    """

    def __init__(self) -> None:
        # (step, tags, values): the tags are a plan's tuple, or a list when a step adds to them
        self._pending: list[tuple[int, Sequence[str], list[Tensor]]] = []
        self._in_flight: list[HostCopy] = []

    @property
    def in_flight(self) -> bool:
        """Whether a copy has been started and not logged yet."""
        return bool(self._in_flight)

    def add(self, step: int, names: Sequence[str], values: list[Tensor]) -> None:
        """Queue the scalars of one step: ``names`` in the order of the flattened ``values``."""
        self._pending.append((step, names, values))

    def start_copy(self) -> None:
        """Start one asynchronous host copy of everything queued."""
        if not self._pending:
            return
        rows = [(step, names) for step, names, _ in self._pending]
        values = torch.cat([v.detach().float().reshape(-1) for _, _, vectors in self._pending for v in vectors])
        done = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, device="cpu", pin_memory=True)
            host.copy_(values, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            values = host
        self._in_flight.append(HostCopy(rows, values, done))
        self._pending = []

    def emit(self, trainer: pl.Trainer, wait: bool, leave_out: set[str] | None = None) -> None:
        """Log the copies that have finished (all of them with ``wait``), without the tags in ``leave_out``."""
        while self._in_flight and (wait or self._in_flight[0].ready()):
            for step, metrics in self._in_flight.pop(0).metrics():
                if leave_out:
                    metrics = {tag: value for tag, value in metrics.items() if tag not in leave_out}
                log_metrics(trainer, metrics, step)
