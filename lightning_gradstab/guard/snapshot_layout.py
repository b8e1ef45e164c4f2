"""How a rollback snapshot lays out the state it copies: one flat list of tensors and a skeleton pointing into it.

:func:`flatten_state` replaces every tensor of the state to keep (the model's parameters and buffers, each
optimizer's per-parameter state, the loss scale) by a :class:`Slot`: its index in a flat list of local, detached
tensors, its device, and a DTensor's mesh and placements. The flat list is what a snapshot copies (into host
buffers or a file); the skeleton says where each tensor goes back. With the model's tensor names it is also the
manifest :func:`check_model` and :func:`check_optimizers` compare the live model and optimizers against before
anything is written. :func:`encode_skeleton` / :func:`decode_skeleton` turn it into plain values for a checkpoint
(:func:`decode_checkpoint` checks what a checkpoint holds); :func:`restored_value` and
:func:`restore_optimizer_states` copy a snapshot back into the live tensors in place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradstab.distributed import local_shard
from lightning_gradstab.guard.snapshot_budget import KEEPS
from lightning_gradstab.guard.snapshot_disk import SnapshotUnusable


@dataclass(frozen=True)
class Slot:
    """Where a tensor of the snapshot sits (its index in the flat list) and what it was on the device."""

    index: int
    device: torch.device
    dtensor_spec: tuple[Any, Any] | None  # (device_mesh, placements) of a DTensor value


def flatten_state(value: Any, tensors: list[Tensor]) -> Any:
    """``value`` with every tensor replaced by a :class:`Slot` into ``tensors`` (their local, detached data)."""
    if isinstance(value, Tensor):
        dtensor: Any = value  # a DTensor when it has to_local (duck-typed, as in _local): mesh and placements
        spec = (dtensor.device_mesh, dtensor.placements) if hasattr(value, "to_local") else None
        local = local_shard(value.detach())
        tensors.append(local)
        return Slot(len(tensors) - 1, local.device, spec)
    if isinstance(value, dict):
        return {key: flatten_state(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(flatten_state(item, tensors) for item in value)
    return copy.deepcopy(value)


def model_entries(module: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` of the parameters then buffers of ``module``, each once (tied ones are one tensor).

    Names drop ``torch.compile``'s ``_orig_mod.`` so a snapshot names the same tensors compiled or not."""
    seen: set[int] = set()
    entries: list[tuple[str, Tensor]] = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            entries.append((name.replace("_orig_mod.", ""), tensor))
    return entries


def model_tensors(module: nn.Module) -> list[Tensor]:
    """Parameters then buffers of ``module``, each once (tied ones are one tensor)."""
    return [tensor for _, tensor in model_entries(module)]


def raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The user's optimizer behind a ``LightningOptimizer`` (``optimizer`` itself when it is not wrapped)."""
    return getattr(optimizer, "_optimizer", optimizer)  # Lightning's LightningOptimizer wraps the real one


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter ``optimizer`` updates, group by group: the order its saved states are kept in."""
    return [p for group in raw_optimizer(optimizer).param_groups for p in group["params"]]


def scaler_tensors(scaler: Any) -> dict[str, Tensor] | None:
    """The ``GradScaler``'s scale and growth tracker as its own device tensors (``scaler.state_dict()`` would
    read them on the host: a sync), ``None`` if disabled or not initialised by a first scaled step yet."""
    if scaler is None or not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
        return None
    return {"_scale": scaler._scale, "_growth_tracker": scaler._growth_tracker}


def check_model(module: nn.Module, skeleton: dict[str, Any], shapes: list[tuple[torch.dtype, torch.Size]]) -> None:
    """Raise :class:`SnapshotUnusable` unless ``module`` has the snapshot's tensors: the same parameter and buffer
    names in the same order, and each with the ``(dtype, shape)`` of ``shapes`` (the snapshot's stored tensors)."""
    live, slots = model_entries(module), skeleton["model"]
    names = skeleton.get("model_names")
    if names is not None and [name for name, _ in live] != list(names):
        missing = sorted(set(names) - {name for name, _ in live})
        extra = sorted({name for name, _ in live} - set(names))
        raise SnapshotUnusable(
            f"the module has {len(live)} parameters and buffers, the snapshot {len(names)}"
            + (f"; not in the module: {missing[:3]}" if missing else "")
            + (f"; not in the snapshot: {extra[:3]}" if extra else "")
            + ": restore into the model the snapshot was taken of"
        )
    if len(live) != len(slots):
        raise SnapshotUnusable(
            f"the module has {len(live)} parameters and buffers, the snapshot {len(slots)}: restore into the "
            "model the snapshot was taken of"
        )
    for (name, tensor), slot in zip(live, slots, strict=True):
        dtype, shape = shapes[slot.index]
        local = local_shard(tensor)
        if local.shape != shape or local.dtype != dtype:
            raise SnapshotUnusable(
                f"{name!r} is {tuple(local.shape)} {local.dtype} in the module, {tuple(shape)} {dtype} in the "
                "snapshot: restore into the model the snapshot was taken of"
            )


def check_optimizers(optimizers: Any, saved: list[Any]) -> None:
    """Raise :class:`SnapshotUnusable` unless ``optimizers`` are as many as the snapshot's, each updating as many
    parameters as its snapshot holds states for (``saved``: the skeleton's ``"optimizers"``)."""
    if len(optimizers) != len(saved):
        raise SnapshotUnusable(f"{len(optimizers)} optimizers given, the snapshot holds {len(saved)}")
    for index, (optimizer, states) in enumerate(zip(optimizers, saved, strict=True)):
        count = len(optimizer_parameters(optimizer))
        if count != len(states):
            raise SnapshotUnusable(
                f"optimizer {index} updates {count} parameters, its snapshot {len(states)}: restore into "
                "the optimizers the snapshot was taken of"
            )


def restored_value(current: Any, saved: Any, tensors: list[Tensor], parameter: Tensor | None = None) -> Any:
    """``saved`` copied into ``current`` where it has the same shape and dtype, else a new device copy (a
    DTensor again if it was one, or if it has the shape of its ``parameter``'s local shard: FSDP2's state)."""
    if isinstance(saved, Slot):
        source = tensors[saved.index]
        if isinstance(current, Tensor):
            target = local_shard(current)
            if target.shape == source.shape and target.dtype == source.dtype:
                target.copy_(source)
                return current
        restored = source.to(saved.device, copy=True)
        spec = saved.dtensor_spec
        shard: Any = parameter  # a DTensor when it has to_local (duck-typed, as in local_shard); None has none
        if spec is None and hasattr(shard, "to_local") and local_shard(shard).shape == source.shape:
            spec = (shard.device_mesh, shard.placements)
        if spec is not None:
            from torch.distributed.tensor import DTensor

            restored = DTensor.from_local(restored, spec[0], spec[1], run_check=False)
        return restored
    if isinstance(saved, dict):
        old = current if isinstance(current, dict) else {}
        return {key: restored_value(old.get(key), value, tensors, parameter) for key, value in saved.items()}
    if isinstance(saved, (list, tuple)):
        old_items = (
            current if isinstance(current, (list, tuple)) and len(current) == len(saved) else [None] * len(saved)
        )
        return type(saved)(restored_value(c, s, tensors, parameter) for c, s in zip(old_items, saved, strict=True))
    return copy.deepcopy(saved)


def restore_optimizer_states(optimizers: Any, saved: list[Any], tensors: list[Tensor]) -> None:
    """Copy each optimizer's saved per-parameter state (``saved``: the skeleton's ``"optimizers"``) back into its
    ``state`` in place; a parameter without state at the snapshot loses its state (re-initialised lazily)."""
    # the structure was checked by ``check_optimizers``
    for optimizer, states in zip(optimizers, saved, strict=True):
        raw, parameters = raw_optimizer(optimizer), optimizer_parameters(optimizer)
        for parameter, state in zip(parameters, states, strict=True):
            if state is None:  # no state yet at the snapshot: the optimizer initialises it again lazily
                raw.state.pop(parameter, None)
                continue
            current = raw.state.get(parameter) or {}
            raw.state[parameter] = {
                key: restored_value(current.get(key), value, tensors, parameter) for key, value in state.items()
            }


_SLOT_TAG = "gradstab-snapshot-slot"


def slots_in(value: Any) -> list[Any]:
    """Every :class:`Slot` in a decoded skeleton part (a list, dict or ``None``)."""
    if isinstance(value, Slot):
        return [value]
    if isinstance(value, dict):
        return [slot for item in value.values() for slot in slots_in(item)]
    if isinstance(value, (list, tuple)):
        return [slot for item in value for slot in slots_in(item)]
    return []


def encode_skeleton(value: Any) -> Any:
    """The skeleton in plain values (``torch.load(weights_only=True)`` reads them): a slot becomes a tagged tuple;
    a DTensor's mesh is not kept (a restore takes it from the parameter)."""
    if isinstance(value, Slot):
        return (_SLOT_TAG, value.index, str(value.device))
    if isinstance(value, dict):
        return {key: encode_skeleton(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(encode_skeleton(item) for item in value)
    return value


def decode_checkpoint(state: dict[str, Any]) -> tuple[list[Tensor], Any, str, int | None]:
    """``(tensors on the host, skeleton, keep, step)`` of a snapshot's checkpoint form (what
    ``RollbackSnapshot.state_dict`` wrote); raises ``ValueError`` when it is malformed: a key missing or of the
    wrong type, an unknown ``keep``, or slots that do not match its tensors."""
    try:
        host = [tensor.to("cpu") for tensor in state["tensors"]]
        skeleton = decode_skeleton(state["skeleton"])
        saved_keep, step = state["keep"], state["step"]
        slots = [*skeleton["model"], *slots_in(skeleton["optimizers"]), *slots_in(skeleton["scaler"])]
        names = skeleton["model_names"]
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"RollbackSnapshot state is malformed (missing or wrong {error})") from None
    if saved_keep not in KEEPS or len(names) != len(skeleton["model"]) or any(
        not isinstance(s, Slot) or not 0 <= s.index < len(host) for s in slots
    ):
        raise ValueError("RollbackSnapshot state is malformed (its slots do not match its tensors)")
    return host, skeleton, saved_keep, step


def decode_skeleton(value: Any) -> Any:
    """The skeleton :func:`encode_skeleton` wrote, its slots :class:`Slot` again (without a DTensor spec)."""
    if isinstance(value, tuple) and len(value) == 3 and value[0] == _SLOT_TAG:
        return Slot(int(value[1]), torch.device(value[2]), None)
    if isinstance(value, dict):
        return {key: decode_skeleton(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(decode_skeleton(item) for item in value)
    return value

