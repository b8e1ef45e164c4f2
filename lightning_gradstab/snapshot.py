"""Rollback snapshots: the copy of training state a rollback returns to, kept within a memory bound.

A rollback is only as good as what it restores. Weights alone leave the optimizer's moments at their
post-explosion values (Adam's second moment, inflated by the spike, then damps every later update for
``1 / (1 - beta2)`` steps), so the default keeps weights *and* optimizer state; the fp16 ``GradScaler``'s scale
and growth tracker travel with them. That is 3x the weights' bytes with Adam: 84 GB per rank for a 7B-parameter
model in fp32 (7e9 x 4 B weights + 2 x 7e9 x 4 B moments), which no host holds for every rank of a node. So a
snapshot has a bound (``max_bytes``, by default a share of the host's RAM) and, above it, goes to a file
written by a background thread with at most ``max_bytes`` of host copies in flight.

What is copied is each rank's *local* data: parameters, buffers and ``optimizer.state`` tensors, with DTensor
(FSDP2) values reduced to their local shard and FSDP1 parameters being the rank's flat-parameter views. Nothing
goes through ``state_dict`` hooks, so a sharded model is never gathered: under FSDP with ``N`` ranks each rank
holds ``1/N`` of the bytes. Restores copy into the live tensors in place (references held by the optimizer, the
strategy or a compiled graph stay valid) and keep each param group's *current* hyper-parameters, which belong
to the schedulers' present rather than the snapshot's past.

A checkpoint written by Lightning's ``ModelCheckpoint`` is no substitute: its step is chosen by the
checkpoint schedule, not by gradient health (it may be written after an explosion began, or thousands of steps
back), and sharded checkpoints are strategy-specific directories that only the strategy can load mid-fit.
"""

from __future__ import annotations

import copy
import os
import queue
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

SnapshotKeep = Literal["weights", "weights+optimizer"]
"""What a snapshot holds: the model's parameters and buffers, or those and every optimizer's state."""
SnapshotLocation = Literal["memory", "disk"]
"""Where a snapshot lives: host RAM, or a file written by a background thread."""

KEEPS: tuple[str, ...] = ("weights", "weights+optimizer")
LOCATIONS: tuple[str, ...] = ("memory", "disk")

HOST_MEMORY_SHARE = 0.25
"""Share of the host's physical RAM that the snapshots of all ranks on it may hold together by default."""
AVAILABLE_MEMORY_SHARE = 0.5
"""...and at most this share of the RAM available when the bound is computed (other jobs, page cache)."""

DISK_SHARE = 0.5
"""Share of a rank's part of the free disk space its snapshot file may take (the rest is left to checkpoints)."""

_STATE_VERSION = 1  # layout of RollbackSnapshot.state_dict()
_ALIGNMENT = 64  # bytes: every tensor in a snapshot file starts on a boundary any dtype can be viewed from


def host_memory_bytes() -> tuple[int, int]:
    """``(total, available)`` bytes of host RAM (``/proc/meminfo``; ``os.sysconf`` total where it is absent)."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                name, _, rest = line.partition(":")
                values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = values.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, values.get("MemAvailable", total)


def local_process_count() -> int:
    """Training processes sharing this host: ``LOCAL_WORLD_SIZE`` where set (torchrun), else, in a process
    group, the world size capped by the GPUs this host has (Lightning's launchers start one rank per device),
    else 1. Erring high only lowers the bound."""
    try:
        if "LOCAL_WORLD_SIZE" in os.environ:
            return max(int(os.environ["LOCAL_WORLD_SIZE"]), 1)
    except ValueError:
        pass
    if dist.is_available() and dist.is_initialized():
        world, devices = dist.get_world_size(), torch.cuda.device_count()
        return min(world, devices) if devices else world
    return 1


def default_max_bytes(local_processes: int | None = None) -> int:
    """The default bound of one rank's snapshot in host RAM.

    ``min(HOST_MEMORY_SHARE * total, AVAILABLE_MEMORY_SHARE * available) / local_processes``: a quarter of the
    host's RAM shared by the ranks on it, less when the host is already busy. On a node with 1 TiB RAM and 8
    ranks that is 32 GiB per rank: a 7B-parameter fp32 model with Adam (84 GB) goes to disk, its FSDP shard over
    8 ranks (10.5 GB) stays in memory.

    Example::

        default_max_bytes(local_processes=8) / 2**30  # GiB per rank on this host
    """
    total, available = host_memory_bytes()
    processes = local_processes if local_processes is not None else local_process_count()
    return int(min(HOST_MEMORY_SHARE * total, AVAILABLE_MEMORY_SHARE * available) / max(processes, 1))


def format_bytes(nbytes: float) -> str:
    """``nbytes`` in binary units with 3 significant digits, e.g. ``'576 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} TiB"


def validate_snapshot_options(
    keep: object, location: object, max_bytes: object, directory: object, *, prefix: str = ""
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument (``prefix`` + its name) unless the options are valid.

    A callback exposing them as, e.g., ``snapshot_keep`` passes ``prefix="snapshot_"`` so the message names
    its own argument.

    Example::

        validate_snapshot_options("weights", "disk", 2**30, "/scratch/run1", prefix="snapshot_")
    """
    if keep not in KEEPS:
        raise ValueError(f"`{prefix}keep` must be one of {KEEPS}, got {keep!r}")
    if location not in LOCATIONS:
        raise ValueError(f"`{prefix}location` must be one of {LOCATIONS}, got {location!r}")
    if (
        max_bytes != "auto"
        and max_bytes is not None
        and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1)
    ):
        raise ValueError(f"`{prefix}max_bytes` must be a positive int (bytes), 'auto' or None, got {max_bytes!r}")
    if directory is not None and not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"`{prefix}directory` must be a path (str or os.PathLike) or None, got {directory!r}")


@dataclass(frozen=True)
class _Slot:
    """Where a tensor of the snapshot sits (its index in the flat list) and what it was on the device."""

    index: int
    device: torch.device
    dtensor_spec: tuple[Any, Any] | None  # (device_mesh, placements) of a DTensor value


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _flatten(value: Any, tensors: list[Tensor]) -> Any:
    """``value`` with every tensor replaced by a :class:`_Slot` into ``tensors`` (their local, detached data)."""
    if isinstance(value, Tensor):
        spec = (value.device_mesh, value.placements) if hasattr(value, "to_local") else None
        local = _local(value.detach())
        tensors.append(local)
        return _Slot(len(tensors) - 1, local.device, spec)
    if isinstance(value, dict):
        return {key: _flatten(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_flatten(item, tensors) for item in value)
    return copy.deepcopy(value)


def _model_tensors(module: nn.Module) -> list[Tensor]:
    """Parameters then buffers of ``module``, each once (tied ones are one tensor)."""
    seen: set[int] = set()
    tensors: list[Tensor] = []
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append(tensor)
    return tensors


def _raw(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)  # Lightning's LightningOptimizer wraps the real one


def _optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in _raw(optimizer).param_groups for p in group["params"]]


def _scaler_tensors(scaler: Any) -> dict[str, Tensor] | None:
    """The ``GradScaler``'s scale and growth tracker as its own device tensors (``scaler.state_dict()`` would
    read them on the host: a sync), ``None`` if disabled or not initialised by a first scaled step yet."""
    if scaler is None or not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
        return None
    return {"_scale": scaler._scale, "_growth_tracker": scaler._growth_tracker}


class RollbackSnapshot:
    """The training state a rollback returns to: weights, optimizer state and loss scale, within a memory bound.

    :meth:`take` copies the local state into host buffers (refreshed in place: the second snapshot of the same
    model allocates nothing) or into a file; :meth:`restore` copies it back into the live tensors in place.
    When a snapshot would hold more than ``max_bytes`` of host RAM it goes to a file instead (a message says so
    once), so the default is safe for a 7B-parameter model on an ordinary host; see ``docs/guard.md``.

    Under ``torch.distributed`` every rank snapshots and restores only its own data (a shard under FSDP) on the
    same steps; nothing here communicates.

    Args:
        keep: ``"weights+optimizer"`` (default: an exact rollback, Adam's moments included) or ``"weights"``
            (parameters, buffers and the loss scale: a third of the bytes with Adam; a restore leaves the
            optimizer state as it is).
        location: ``"memory"`` (host RAM, default) or ``"disk"`` (a file written by a background thread; the
            training step waits only while more than ``max_bytes`` of copies are in flight, a restore waits for
            the write to finish).
        max_bytes: most bytes a snapshot may hold in host RAM: ``"auto"`` (default, :func:`default_max_bytes`),
            a positive int, or ``None`` (no bound). Above it a ``"memory"`` snapshot goes to disk; for ``"disk"``
            it bounds the copies in flight. A file may take half of this rank's share of the free disk space
            (``DISK_SHARE``, the rest is left to checkpoints); a snapshot that fits neither is not kept (said
            once; :attr:`available` is then false and a rollback must do without).
        directory: folder of the snapshot file (``rollback-rank{rank}.bin``); ``None``: ``gradstab_rollback``
            in the working directory. Use a disk, not a tmpfs: a RAM-backed folder defeats the bound.
        local_processes: ranks sharing this host, dividing the ``"auto"`` bound (default:
            :func:`local_process_count`; a callback can pass ``trainer.num_devices``).

    Example::

        import torch

        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        snapshot = RollbackSnapshot(keep="weights+optimizer", location="memory", max_bytes=2**20)
        snapshot.take(model, [optimizer], step=1)
        before = model.weight.detach().clone()
        optimizer.step()  # training moves on ...
        snapshot.restore(model, [optimizer])  # ... and comes back, moments included
        assert torch.equal(model.weight, before) and snapshot.step == 1
    """

    def __init__(
        self,
        keep: SnapshotKeep = "weights+optimizer",
        location: SnapshotLocation = "memory",
        max_bytes: int | Literal["auto"] | None = "auto",
        directory: str | Path | None = None,
        local_processes: int | None = None,
    ) -> None:
        validate_snapshot_options(keep, location, max_bytes, directory)
        if local_processes is not None and (
            isinstance(local_processes, bool) or not isinstance(local_processes, int) or local_processes < 1
        ):
            raise ValueError(f"`local_processes` must be a positive int or None, got {local_processes!r}")
        self.keep: SnapshotKeep = keep
        self.requested_location: SnapshotLocation = location
        self.directory = Path(directory) if directory is not None else None
        self.local_processes = local_processes
        self._max_bytes_option = max_bytes
        self._resolved_max_bytes: int | None = None
        self.step: int | None = None
        """The step :meth:`take` was last called with (``None``: no snapshot, or taken without a step)."""
        self.location: SnapshotLocation | None = None
        """Where the current snapshot lives (``None``: there is none)."""
        self.state_bytes = 0
        """Bytes of the state the current snapshot copied (what memory mode holds; the file's payload)."""
        self._skeleton: Any = None
        self._host: list[Tensor] = []
        self._offsets: list[tuple[int, torch.dtype, torch.Size]] = []
        self._writer: _FileWriter | None = None
        self._warned: set[str] = set()

    @property
    def max_bytes(self) -> int | None:
        """The bound in bytes (``"auto"`` is resolved against the host's RAM on first use)."""
        if self._max_bytes_option == "auto":
            if self._resolved_max_bytes is None:
                self._resolved_max_bytes = default_max_bytes(self.local_processes)
            return self._resolved_max_bytes
        return self._max_bytes_option  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes the snapshot holds in host RAM now (memory mode: its buffers; disk: the copies in flight)."""
        held = sum(t.nbytes for t in self._host)
        return held + (self._writer.pending_bytes if self._writer is not None else 0)

    @property
    def available(self) -> bool:
        """Whether a snapshot exists that :meth:`restore` can load (a failed disk write leaves none)."""
        if self.location == "disk" and self._writer is not None and self._writer.done.is_set():
            return self._writer.error is None
        return self.location is not None

    @property
    def ready(self) -> bool:
        """Whether :meth:`restore` can load a snapshot *now* without waiting: it exists and no disk write of it is
        still in flight (whose outcome, success or failure, is not known yet). A host-side check: no sync."""
        return self.available and (self._writer is None or self._writer.done.is_set())

    @property
    def path(self) -> Path:
        """The snapshot file of this rank (used when the snapshot is on disk)."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))
        return (self.directory or Path.cwd() / "gradstab_rollback") / f"rollback-rank{rank}.bin"

    def take(
        self,
        module: nn.Module,
        optimizers: list[torch.optim.Optimizer] | tuple[torch.optim.Optimizer, ...] = (),
        scaler: Any = None,
        step: int | None = None,
    ) -> None:
        """Copy the state of ``module`` (and of ``optimizers`` and ``scaler``, see ``keep``) as the new snapshot.

        The previous snapshot is replaced; in memory its buffers are reused where shapes match. A disk write
        still in flight from the previous call is waited for first. ``scaler``: an fp16 ``GradScaler`` whose
        scale and growth tracker are restored with the weights (``None`` or a disabled scaler: nothing).
        """
        self._wait_for_write(raise_error=False)
        state: dict[str, Any] = {"model": _model_tensors(module), "optimizers": None, "scaler": _scaler_tensors(scaler)}
        if self.keep == "weights+optimizer":
            # every torch.optim optimizer keeps its per-parameter state in ``optimizer.state``
            state["optimizers"] = [
                [_raw(optimizer).state.get(p) or None for p in _optimizer_parameters(optimizer)]
                for optimizer in optimizers
            ]
        live: list[Tensor] = []
        skeleton = _flatten(state, live)
        needed = sum(t.nbytes for t in live)
        bound = self.max_bytes
        location = self.requested_location
        over_bound = location == "memory" and bound is not None and needed > bound
        if over_bound or location == "disk":
            location = "disk"
            room = self._disk_room()
            if needed > room:
                self.close()
                self._message_once("no room", needed, bound, room)
                return
            if over_bound:
                self._message_once("to disk", needed, bound, room)
        if location == "memory":
            self._copy_to_memory(live)
        else:
            self._host = []
            self._copy_to_disk(live, bound)
        self._skeleton, self.location, self.state_bytes, self.step = skeleton, location, needed, step

    def restore(
        self,
        module: nn.Module,
        optimizers: list[torch.optim.Optimizer] | tuple[torch.optim.Optimizer, ...] = (),
        scaler: Any = None,
    ) -> None:
        """Copy the snapshot back into ``module``, ``optimizers`` and ``scaler`` in place.

        Each param group's current hyper-parameters (learning rate, momentum, ...) are kept. With
        ``keep="weights"`` the optimizer state is left as it is. Raises ``RuntimeError`` when there is no
        snapshot (or its file could not be written) and ``ValueError`` when the model or the optimizers do
        not have the snapshot's structure.
        """
        if self.location is None:
            raise RuntimeError("RollbackSnapshot.restore: there is no snapshot (none taken yet, or the last not kept)")
        self._wait_for_write()
        tensors, mapping = self._stored_tensors()
        try:
            with torch.no_grad():
                self._restore_model(module, tensors)
                if self._skeleton["optimizers"] is not None:
                    self._restore_optimizers(optimizers, tensors)
                if scaler is not None and self._skeleton["scaler"] is not None:
                    for name, slot in self._skeleton["scaler"].items():  # in place: no host read
                        setattr(scaler, name, _restored(getattr(scaler, name, None), slot, tensors))
        finally:
            del tensors, mapping  # unmap the snapshot file

    def state_dict(self) -> dict[str, Any]:
        """A memory snapshot as plain tensors and values, for a checkpoint (``weights_only`` loading reads it).

        The tensors are the snapshot's own host buffers: save them before the next :meth:`take`. A disk
        snapshot is not carried (it would put its whole size into every checkpoint): after a resume the next
        :meth:`take` makes a new one.
        """
        if self.location != "memory":
            return {"version": _STATE_VERSION, "step": None}
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "keep": self.keep,
            "skeleton": _encode(self._skeleton),
            "tensors": list(self._host),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the snapshot it holds becomes this one (none if it holds none)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"RollbackSnapshot state has version {state.get('version')!r}; this code reads {_STATE_VERSION}"
            )
        self.close()
        if state["step"] is None and "tensors" not in state:
            return
        self._host = [tensor.to("cpu") for tensor in state["tensors"]]
        self._skeleton = _decode(state["skeleton"])
        self.keep, self.step, self.location = state["keep"], state["step"], "memory"
        self.state_bytes = sum(tensor.nbytes for tensor in self._host)

    def close(self) -> None:
        """Drop the snapshot: free its host buffers and delete its file."""
        self._wait_for_write(raise_error=False)
        self._host, self._skeleton, self.location, self.step, self.state_bytes = [], None, None, None, 0
        if self._writer is not None:
            self._writer.path.unlink(missing_ok=True)
            self._writer = None

    # -- storage ------------------------------------------------------------------------------------------

    def _copy_to_memory(self, live: list[Tensor]) -> None:
        host = self._host
        for index, tensor in enumerate(live):
            if index < len(host) and host[index].shape == tensor.shape and host[index].dtype == tensor.dtype:
                host[index].copy_(tensor)  # no allocation: refreshing a snapshot is a plain copy
            elif index < len(host):
                host[index] = tensor.to("cpu", copy=True)
            else:
                host.append(tensor.to("cpu", copy=True))
        del host[len(live) :]
        if self._writer is not None:  # an older snapshot on disk is superseded
            self._writer.path.unlink(missing_ok=True)
            self._writer = None

    def _copy_to_disk(self, live: list[Tensor], bound: int | None) -> None:
        self._writer = writer = _FileWriter(self.path, max_in_flight=bound)
        self._offsets = []
        offset = 0
        for tensor in live:
            offset = -(-offset // _ALIGNMENT) * _ALIGNMENT
            self._offsets.append((offset, tensor.dtype, tensor.shape))
            if writer.error is not None:  # the file cannot be written: no point copying the rest
                break
            buffer = writer.staging(tensor.nbytes)
            buffer[: tensor.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
            writer.put(offset, buffer, tensor.nbytes)
            del buffer
            offset += tensor.nbytes
        writer.finish()

    def _wait_for_write(self, raise_error: bool = True) -> None:
        """Wait for a disk write in flight; a failed one leaves no snapshot (said once, raised if asked)."""
        writer = self._writer
        if writer is None:
            return
        writer.done.wait()
        if writer.error is None:
            return
        self._writer, self._skeleton, self.location, self.step, self.state_bytes = None, None, None, None, 0
        message = f"RollbackSnapshot: writing {str(writer.path)!r} failed ({writer.error!r}); there is no snapshot"
        if raise_error:
            raise RuntimeError(message)
        if "write failed" not in self._warned:
            self._warned.add("write failed")
            warnings.warn(f"lightning_gradstab: {message} until a later one is written.", stacklevel=3)

    def _stored_tensors(self) -> tuple[list[Tensor], Any]:
        if self.location == "memory":
            return self._host, None
        assert self._writer is not None
        mapping = np.memmap(self._writer.path, dtype=np.uint8, mode="c") if self.state_bytes else None
        tensors = []
        for offset, dtype, shape in self._offsets:
            size = torch.Size(shape).numel() * dtype.itemsize
            if size == 0 or mapping is None:
                tensors.append(torch.empty(shape, dtype=dtype))
            else:  # a copy-on-write view of the file: pages are read as they are copied to the device
                tensors.append(torch.from_numpy(mapping[offset : offset + size]).view(dtype).reshape(shape))
        return tensors, mapping

    def _disk_room(self) -> int:
        """Bytes this rank's snapshot file may take: half of its share of the free space (the rest is left
        to checkpoints and logs), plus what its current file already occupies (it is overwritten)."""
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return 0
        processes = self.local_processes if self.local_processes is not None else local_process_count()
        current = self.path.stat().st_size if self.path.is_file() else 0
        return int(DISK_SHARE * free / max(processes, 1)) + current

    def _message_once(self, kind: str, needed: int, bound: int | None, room: int) -> None:
        if kind in self._warned or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
            return
        self._warned.add(kind)
        limit = "no bound" if bound is None else f"max_bytes={bound} ({format_bytes(bound)})"
        if kind == "to disk":
            message = (
                f"the rollback snapshot needs {format_bytes(needed)} per rank ({self.keep}), above {limit}; it is "
                f"written to {str(self.path.parent)!r} by a background thread instead of being held in RAM. Raise "
                "max_bytes, choose keep='weights', or shard the model (FSDP: each rank keeps its shard) to keep it "
                "in memory."
            )
        else:
            message = (
                f"the rollback snapshot needs {format_bytes(needed)} per rank ({self.keep}), above {limit} and "
                f"above {format_bytes(room)}, this rank's half of the free space in {str(self.path.parent)!r}: NO "
                "snapshot is kept, so a rollback cannot happen. Choose keep='weights', shard the model, or point "
                "the snapshot directory at a larger disk."
            )
        warnings.warn(f"lightning_gradstab: {message}", stacklevel=3)

    # -- restore ------------------------------------------------------------------------------------------

    def _restore_model(self, module: nn.Module, tensors: list[Tensor]) -> None:
        live = _model_tensors(module)
        slots = self._skeleton["model"]
        if len(live) != len(slots) or any(
            _local(t).shape != tensors[s.index].shape for t, s in zip(live, slots, strict=False)
        ):
            raise ValueError(
                f"RollbackSnapshot.restore: the module has {len(live)} parameters and buffers, the snapshot "
                f"{len(slots)} (or their shapes differ): restore into the model the snapshot was taken of"
            )
        for tensor, slot in zip(live, slots, strict=True):
            _local(tensor.detach()).copy_(tensors[slot.index])

    def _restore_optimizers(self, optimizers: Any, tensors: list[Tensor]) -> None:
        saved = self._skeleton["optimizers"]
        if len(optimizers) != len(saved):
            raise ValueError(
                f"RollbackSnapshot.restore: {len(optimizers)} optimizers given, the snapshot holds {len(saved)}"
            )
        for optimizer, states in zip(optimizers, saved, strict=True):
            raw, parameters = _raw(optimizer), _optimizer_parameters(optimizer)
            if len(parameters) != len(states):
                raise ValueError(
                    f"RollbackSnapshot.restore: an optimizer updates {len(parameters)} parameters, its snapshot "
                    f"{len(states)}: restore into the optimizers the snapshot was taken of"
                )
            for parameter, state in zip(parameters, states, strict=True):
                if state is None:  # no state yet at the snapshot: the optimizer initialises it again lazily
                    raw.state.pop(parameter, None)
                    continue
                current = raw.state.get(parameter) or {}
                raw.state[parameter] = {
                    key: _restored(current.get(key), value, tensors, parameter) for key, value in state.items()
                }


def _restored(current: Any, saved: Any, tensors: list[Tensor], parameter: Tensor | None = None) -> Any:
    """``saved`` copied into ``current`` where it has the same shape and dtype, else a new device copy (a
    DTensor again if it was one, or if it has the shape of its ``parameter``'s local shard: FSDP2's state)."""
    if isinstance(saved, _Slot):
        source = tensors[saved.index]
        if isinstance(current, Tensor):
            target = _local(current)
            if target.shape == source.shape and target.dtype == source.dtype:
                target.copy_(source)
                return current
        restored = source.to(saved.device, copy=True)
        spec = saved.dtensor_spec
        if spec is None and hasattr(parameter, "to_local") and parameter.to_local().shape == source.shape:
            spec = (parameter.device_mesh, parameter.placements)
        if spec is not None:
            from torch.distributed.tensor import DTensor

            restored = DTensor.from_local(restored, spec[0], spec[1], run_check=False)
        return restored
    if isinstance(saved, dict):
        old = current if isinstance(current, dict) else {}
        return {key: _restored(old.get(key), value, tensors, parameter) for key, value in saved.items()}
    if isinstance(saved, (list, tuple)):
        old = current if isinstance(current, (list, tuple)) and len(current) == len(saved) else [None] * len(saved)
        return type(saved)(_restored(c, s, tensors, parameter) for c, s in zip(old, saved, strict=True))
    return copy.deepcopy(saved)


_SLOT_TAG = "gradstab-snapshot-slot"


def _encode(value: Any) -> Any:
    """The skeleton in plain values (``torch.load(weights_only=True)`` reads them): a slot becomes a tagged tuple;
    a DTensor's mesh is not kept (a restore takes it from the parameter)."""
    if isinstance(value, _Slot):
        return (_SLOT_TAG, value.index, str(value.device))
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_encode(item) for item in value)
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 3 and value[0] == _SLOT_TAG:
        return _Slot(int(value[1]), torch.device(value[2]), None)
    if isinstance(value, dict):
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(item) for item in value)
    return value


class _FileWriter:
    """Writes pieces of a snapshot into a file from a background thread, through a pool of staging buffers.

    The training thread asks :meth:`staging` for a host buffer, copies a tensor into it and queues it with
    :meth:`put`; the writer writes it and hands the buffer back to the pool for the next piece. The pool never
    grows past ``max_in_flight`` bytes (one piece larger than that still gets a buffer of its own), so the host
    RAM the copies use stays under the bound: a fresh allocation per piece would not, since the allocator does
    not reliably reuse the blocks another thread freed. ``staging`` waits only while the pool is full.
    """

    def __init__(self, path: Path, max_in_flight: int | None) -> None:
        self.path = path
        self.max_in_flight = max_in_flight
        self.pending_bytes = 0  # bytes of staging buffers allocated (in flight or waiting in the pool)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._space = threading.Condition()
        self._pool: list[Tensor] = []
        self._queue: queue.SimpleQueue[tuple[int, Tensor, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="gradstab-snapshot-writer", daemon=True)
        self._thread.start()

    def staging(self, nbytes: int) -> Tensor:
        """A ``uint8`` host buffer of at least ``nbytes``, from the pool or newly allocated under the bound."""
        with self._space:
            while True:
                fitting = [i for i, buffer in enumerate(self._pool) if buffer.numel() >= nbytes]
                if fitting:
                    return self._pool.pop(min(fitting, key=lambda i: self._pool[i].numel()))
                room = self.max_in_flight is None or self.pending_bytes + nbytes <= self.max_in_flight
                if room or self.pending_bytes == 0 or self.error is not None:
                    self.pending_bytes += nbytes
                    return torch.empty(nbytes, dtype=torch.uint8)
                if self._pool:  # only smaller buffers are free: drop one to make room
                    self.pending_bytes -= self._pool.pop(0).numel()
                    continue
                self._space.wait()

    def put(self, offset: int, buffer: Tensor, nbytes: int) -> None:
        """Queue the first ``nbytes`` of a :meth:`staging` buffer, to be written at ``offset``."""
        self._queue.put((offset, buffer, nbytes))

    def finish(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        # written in place: the previous snapshot's file is overwritten, so the disk never holds two of them
        # (a restore waits for the write, and the snapshot lives no longer than the process anyway)
        finished = False  # ``finish`` was seen
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as stream:
                while not (finished := (item := self._queue.get()) is None):
                    offset, buffer, nbytes = item
                    if nbytes:
                        stream.seek(offset)
                        stream.write(memoryview(buffer[:nbytes].numpy()))
                    del item
                    with self._space:
                        self._pool.append(buffer)
                        self._space.notify_all()
                    del buffer
        except BaseException as error:  # reported by the next take/restore; training goes on
            with self._space:
                self.error = error
                self._space.notify_all()  # ``staging`` stops waiting for a writer that is gone
            if self.path.parent.is_dir():
                self.path.unlink(missing_ok=True)
            while not finished:  # drain until ``finish``
                finished = self._queue.get() is None
        finally:
            with self._space:
                self._pool.clear()
                self.pending_bytes = 0
            _return_freed_memory()
            with self._space:
                self.done.set()
                self._space.notify_all()


def _return_freed_memory() -> None:
    """Hand the freed copies back to the OS: glibc keeps large freed blocks in its heap (its mmap threshold
    grows after the first free), so the resident set would stay as if the copies were still held."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# -- the tuple snapshot the guard has used so far -------------------------------------------------------------


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
        old = previous if isinstance(previous, (list, tuple)) and len(previous) == len(value) else [None] * len(value)
        return type(value)(_to_cpu(item, before) for item, before in zip(value, old, strict=True))
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
