"""The tuple snapshot the guard used before :class:`~lightning_gradstab.guard.snapshot.RollbackSnapshot`: model
and optimizer ``state_dict`` copied to host memory, with no bound, no disk and no loss scale.

The guard no longer uses it. It stays for the benchmarks: ``benchmarks/snapshot_memory.py`` measures it as the
``state_dict (before)`` row the rollback snapshot is compared with, and ``benchmarks/guard_overhead.py`` times
its copy and its in-place refresh.
"""

from __future__ import annotations

from typing import Any

import torch


def _to_cpu(value: Any, previous: Any = None) -> Any:
    if isinstance(value, torch.Tensor):
        source = value.detach()
        if isinstance(previous, torch.Tensor) and previous.shape == source.shape and previous.dtype == source.dtype:
            return previous.copy_(source)  # no allocation: refreshing a snapshot is a plain copy
        return source.to("cpu", copy=True)
    if isinstance(value, dict):
        old = previous if isinstance(previous, dict) else {}
        return {key: _to_cpu(item, old.get(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        old_items = (
            previous if isinstance(previous, (list, tuple)) and len(previous) == len(value) else [None] * len(value)
        )
        return type(value)(_to_cpu(item, before) for item, before in zip(value, old_items, strict=True))
    return value


TrainingSnapshot = tuple[dict[str, torch.Tensor], list[dict[str, Any]]]
"""Model ``state_dict`` and each optimizer's ``state_dict``, all tensors copied to CPU."""


def snapshot_training_state(
    module: torch.nn.Module, optimizers: list[torch.optim.Optimizer], into: TrainingSnapshot | None = None
) -> TrainingSnapshot:
    """Copy model and optimizer ``state_dict`` to host memory, so accelerator memory is unchanged.

    ``into``: an older snapshot whose host tensors are overwritten where shapes match (no new allocation;
    the older snapshot is then gone). :class:`RollbackSnapshot` adds a memory bound, disk and the loss scale.

    Example::

        snapshot = snapshot_training_state(model, [optimizer])
        snapshot = snapshot_training_state(model, [optimizer], into=snapshot)  # refresh in place
        restore_training_state(model, [optimizer], snapshot)
    """
    old_model, old_optimizers = into if into is not None else (None, [None] * len(optimizers))
    if len(old_optimizers) != len(optimizers):
        old_optimizers = [None] * len(optimizers)
    return _to_cpu(module.state_dict(), old_model), [
        _to_cpu(optimizer.state_dict(), old) for optimizer, old in zip(optimizers, old_optimizers, strict=True)
    ]


def restore_training_state(
    module: torch.nn.Module, optimizers: list[torch.optim.Optimizer], snapshot: TrainingSnapshot
) -> None:
    """Load a :func:`snapshot_training_state` snapshot back in place, keeping each param group's *current*
    hyper-parameters (restoring them would rewind every scheduler).

    Example::

        restore_training_state(model, [optimizer], snapshot)
    """
    model_state, optimizer_states = snapshot
    module.load_state_dict(model_state)  # copies into the existing parameters: references stay valid
    for optimizer, state in zip(optimizers, optimizer_states, strict=True):
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(_to_cpu(state))  # a copy: on CPU the optimizer would alias the snapshot
        for group, values in zip(optimizer.param_groups, hyper, strict=True):
            group.update(values)
