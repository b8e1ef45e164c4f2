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
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gradstab.distributed import local_shard
from lightning_gradstab.snapshot_disk import (
    FileWriter,
    SnapshotUnusable,
    leftover_files,
    new_run_token,
    open_verified,
    snapshot_file_name,
)

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

_STATE_VERSION = 2  # layout of RollbackSnapshot.state_dict() (2: the model's tensor names and dtypes)
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


def _flatten(value: Any, tensors: list[Tensor]) -> Any:
    """``value`` with every tensor replaced by a :class:`_Slot` into ``tensors`` (their local, detached data)."""
    if isinstance(value, Tensor):
        dtensor: Any = value  # a DTensor when it has to_local (duck-typed, as in _local): mesh and placements
        spec = (dtensor.device_mesh, dtensor.placements) if hasattr(value, "to_local") else None
        local = local_shard(value.detach())
        tensors.append(local)
        return _Slot(len(tensors) - 1, local.device, spec)
    if isinstance(value, dict):
        return {key: _flatten(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_flatten(item, tensors) for item in value)
    return copy.deepcopy(value)


def _model_entries(module: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` of the parameters then buffers of ``module``, each once (tied ones are one tensor).

    Names drop ``torch.compile``'s ``_orig_mod.`` so a snapshot names the same tensors compiled or not."""
    seen: set[int] = set()
    entries: list[tuple[str, Tensor]] = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            entries.append((name.replace("_orig_mod.", ""), tensor))
    return entries


def _model_tensors(module: nn.Module) -> list[Tensor]:
    """Parameters then buffers of ``module``, each once (tied ones are one tensor)."""
    return [tensor for _, tensor in _model_entries(module)]


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
        directory: folder of the snapshot file (``gradstab-rollback-<pid>-<random>-rank<r>.bin``: private to
            this run and rank, mode 0600, see :mod:`lightning_gradstab.snapshot_disk`); ``None``:
            ``gradstab_rollback`` in the working directory. Use a disk, not a tmpfs: a RAM-backed folder defeats
            the bound.
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
        directory: str | os.PathLike[str] | None = None,
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
        self._writer: FileWriter | None = None
        self._warned: set[str] = set()
        self._run_token = new_run_token()

    def new_run(self) -> None:
        """Drop the snapshot and its file and start a new run: a later file gets a new name (a callback reused
        for a second ``fit`` never restores, or deletes, the first fit's snapshot)."""
        self.close()
        self._run_token = new_run_token()
        self._warned.clear()

    @property
    def max_bytes(self) -> int | None:
        """The bound in bytes (``"auto"`` is resolved against the host's RAM on first use)."""
        if self._max_bytes_option == "auto":
            if self._resolved_max_bytes is None:
                self._resolved_max_bytes = default_max_bytes(self.local_processes)
            return self._resolved_max_bytes
        return self._max_bytes_option

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
    def usable(self) -> bool:
        """:attr:`ready`, and a disk snapshot's file is still there with the inode and size it was written with
        (one ``stat``: no read, no sync). The checksum is checked by :meth:`problem` before a restore."""
        if not self.ready:
            return False
        return self.location == "memory" or (self._writer is not None and self._writer.intact())

    @property
    def path(self) -> Path:
        """This run's snapshot file of this rank (used when the snapshot is on disk): a name no other run or
        rank shares, ``gradstab-rollback-<pid>-<random>-rank<r>.bin``."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))
        folder = self.directory or Path.cwd() / "gradstab_rollback"
        return folder / snapshot_file_name(self._run_token, rank)

    def leftover_files(self) -> list[Path]:
        """Snapshot files in this snapshot's folder left by processes that are gone (a SIGKILL, a crash): not
        this run's, never deleted by it; a callback names them so the user can."""
        return leftover_files(self.path.parent)

    def take(
        self,
        module: nn.Module,
        optimizers: list[torch.optim.Optimizer] | tuple[torch.optim.Optimizer, ...] = (),
        scaler: Any = None,
        step: int | None = None,
    ) -> None:
        """Copy the state of ``module`` (and of ``optimizers`` and ``scaler``, see ``keep``) as the new snapshot.

        The previous snapshot is replaced; in memory its buffers are reused where shapes match, on disk its
        file is deleted before the new one is written (the disk never holds two). A disk write still in flight
        from the previous call is waited for first. ``scaler``: an fp16 ``GradScaler`` whose scale and growth
        tracker are restored with the weights (``None`` or a disabled scaler: nothing).
        """
        self._wait_for_write(raise_error=False)
        entries = _model_entries(module)
        state: dict[str, Any] = {
            "model": [tensor for _, tensor in entries],
            "optimizers": None,
            "scaler": _scaler_tensors(scaler),
        }
        if self.keep == "weights+optimizer":
            # every torch.optim optimizer keeps its per-parameter state in ``optimizer.state``
            state["optimizers"] = [
                [_raw(optimizer).state.get(p) or None for p in _optimizer_parameters(optimizer)]
                for optimizer in optimizers
            ]
        live: list[Tensor] = []
        skeleton = _flatten(state, live)
        skeleton["model_names"] = [name for name, _ in entries]
        needed = sum(t.nbytes for t in live)
        bound = self.max_bytes
        location = self.requested_location
        over_bound = location == "memory" and bound is not None and needed > bound
        if over_bound or location == "disk":
            location = "disk"
            if self._writer is not None:  # superseded: its bytes are free for the new file
                self._writer.remove()
                self._writer = None
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

    def problem(
        self, module: nn.Module, optimizers: list[torch.optim.Optimizer] | tuple[torch.optim.Optimizer, ...] = ()
    ) -> str | None:
        """Why the snapshot cannot be restored into ``module`` and ``optimizers`` now, or ``None`` if it can.

        Checked, in this order: that there is one; for a disk snapshot, that its file is the one written (inode,
        size, no link) and holds what was written (CRC-32); that the model has the snapshot's tensors (names,
        shapes, dtypes of every parameter and buffer) and the optimizers its parameter counts. Reads the file
        (a rollback's cost, not a step's); no device value is read. Pass ``optimizers=None`` to check the model
        alone (a checkpoint being loaded before the optimizers exist).
        """
        try:
            tensors, mapping = self._verified_tensors(module, optimizers)
        except SnapshotUnusable as error:
            return str(error)
        del tensors, mapping
        return None

    def restore(
        self,
        module: nn.Module,
        optimizers: list[torch.optim.Optimizer] | tuple[torch.optim.Optimizer, ...] = (),
        scaler: Any = None,
    ) -> None:
        """Copy the snapshot back into ``module``, ``optimizers`` and ``scaler`` in place.

        Each param group's current hyper-parameters (learning rate, momentum, ...) are kept. With
        ``keep="weights"`` the optimizer state is left as it is. Everything is checked (see :meth:`problem`)
        before anything is written: raises ``RuntimeError`` when there is no snapshot (or its file could not be
        written) and ``ValueError`` when it is unusable (its file gone or corrupt, or the model or the
        optimizers without the snapshot's structure); the live state is then untouched.
        """
        if self.location is None:
            raise RuntimeError("RollbackSnapshot.restore: there is no snapshot (none taken yet, or the last not kept)")
        self._wait_for_write()
        try:
            tensors, mapping = self._verified_tensors(module, optimizers)
        except SnapshotUnusable as error:
            raise ValueError(f"RollbackSnapshot.restore: {error}") from None
        try:
            with torch.no_grad():
                for tensor, slot in zip(_model_tensors(module), self._skeleton["model"], strict=True):
                    local_shard(tensor.detach()).copy_(tensors[slot.index])
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
            "keep": "weights+optimizer" if self._skeleton["optimizers"] is not None else "weights",
            "skeleton": _encode(self._skeleton),
            "tensors": list(self._host),
        }

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """Continue from :meth:`state_dict`: the snapshot it holds becomes this one (none if it holds none).

        The constructor's settings stay (``keep`` included): a checkpoint's ``"weights+optimizer"`` snapshot
        is kept as weights only under ``keep="weights"``, and a ``"weights"`` one is dropped under
        ``keep="weights+optimizer"`` (it cannot give the exact rollback asked for). Returns why the checkpoint's
        snapshot was dropped, or ``None``; raises ``ValueError`` for another layout version or a malformed state.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else state
            raise ValueError(f"RollbackSnapshot state has version {version!r}; this code reads {_STATE_VERSION}")
        self.close()
        if state.get("step") is None and "tensors" not in state:
            return None
        try:
            host = [tensor.to("cpu") for tensor in state["tensors"]]
            skeleton = _decode(state["skeleton"])
            saved_keep, step = state["keep"], state["step"]
            slots = [*skeleton["model"], *_slots(skeleton["optimizers"]), *_slots(skeleton["scaler"])]
            names = skeleton["model_names"]
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"RollbackSnapshot state is malformed (missing or wrong {error})") from None
        if saved_keep not in KEEPS or len(names) != len(skeleton["model"]) or any(
            not isinstance(s, _Slot) or not 0 <= s.index < len(host) for s in slots
        ):
            raise ValueError("RollbackSnapshot state is malformed (its slots do not match its tensors)")
        if saved_keep == "weights" and self.keep == "weights+optimizer":
            return (
                "the checkpoint's snapshot holds weights only, and this guard keeps weights+optimizer "
                "(snapshot_keep): a new snapshot is taken instead"
            )
        if self.keep == "weights":
            skeleton["optimizers"] = None  # the user's setting: a rollback leaves the optimizer state alone
        self._host, self._skeleton, self.step, self.location = host, skeleton, step, "memory"
        self.state_bytes = sum(tensor.nbytes for tensor in self._host)
        return None

    def close(self) -> None:
        """Drop the snapshot: free its host buffers and delete its file (only ever a file this run created)."""
        self._wait_for_write(raise_error=False)
        self._host, self._skeleton, self.location, self.step, self.state_bytes = [], None, None, None, 0
        if self._writer is not None:
            self._writer.remove()
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
            self._writer.remove()
            self._writer = None

    def _copy_to_disk(self, live: list[Tensor], bound: int | None) -> None:
        self._writer = writer = FileWriter(self.path, max_in_flight=bound)
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
        """The snapshot's tensors: the host buffers, or views of its verified file (a copy-on-write mapping:
        pages are read as they are copied to the device). Raises :class:`SnapshotUnusable`."""
        if self.location == "memory":
            return self._host, None
        if self._writer is None or self._writer.error is not None:
            raise SnapshotUnusable("its disk write failed")
        pieces = [(offset, torch.Size(shape).numel() * dtype.itemsize) for offset, dtype, shape in self._offsets]
        mapping = open_verified(self._writer, pieces)
        tensors = []
        for (offset, dtype, shape), (_, size) in zip(self._offsets, pieces, strict=True):
            if size == 0 or mapping is None:
                tensors.append(torch.empty(shape, dtype=dtype))
            else:
                tensors.append(torch.frombuffer(mapping, dtype=torch.uint8, count=size, offset=offset).view(dtype)
                               .reshape(shape))
        return tensors, mapping

    def _verified_tensors(self, module: nn.Module, optimizers: Any) -> tuple[list[Tensor], Any]:
        """:meth:`_stored_tensors` after every check of :meth:`problem` passed (else :class:`SnapshotUnusable`)."""
        if self.location is None or self._skeleton is None:
            raise SnapshotUnusable("there is no snapshot")
        if not self.ready:
            raise SnapshotUnusable("its disk write is still in flight")
        self._check_model(module)
        tensors, mapping = self._stored_tensors()
        if optimizers is not None and self._skeleton["optimizers"] is not None:
            saved = self._skeleton["optimizers"]
            if len(optimizers) != len(saved):
                raise SnapshotUnusable(f"{len(optimizers)} optimizers given, the snapshot holds {len(saved)}")
            for index, (optimizer, states) in enumerate(zip(optimizers, saved, strict=True)):
                count = len(_optimizer_parameters(optimizer))
                if count != len(states):
                    raise SnapshotUnusable(
                        f"optimizer {index} updates {count} parameters, its snapshot {len(states)}: restore into "
                        "the optimizers the snapshot was taken of"
                    )
        return tensors, mapping

    def _shapes(self) -> list[tuple[torch.dtype, torch.Size]]:
        if self.location == "memory":
            return [(tensor.dtype, tensor.shape) for tensor in self._host]
        return [(dtype, torch.Size(shape)) for _, dtype, shape in self._offsets]

    def _check_model(self, module: nn.Module) -> None:
        live, slots, shapes = _model_entries(module), self._skeleton["model"], self._shapes()
        names = self._skeleton.get("model_names")
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

    def _disk_room(self) -> int:
        """Bytes this rank's snapshot file may take: half of its share of the free space (the rest is left
        to checkpoints and logs); the previous file is deleted before this is asked, so its bytes count as free."""
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return 0
        processes = self.local_processes if self.local_processes is not None else local_process_count()
        return int(DISK_SHARE * free / max(processes, 1))

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

    def _restore_optimizers(self, optimizers: Any, tensors: list[Tensor]) -> None:
        # the structure was checked by ``_verified_tensors``
        for optimizer, states in zip(optimizers, self._skeleton["optimizers"], strict=True):
            raw, parameters = _raw(optimizer), _optimizer_parameters(optimizer)
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
        return {key: _restored(old.get(key), value, tensors, parameter) for key, value in saved.items()}
    if isinstance(saved, (list, tuple)):
        old_items = (
            current if isinstance(current, (list, tuple)) and len(current) == len(saved) else [None] * len(saved)
        )
        return type(saved)(_restored(c, s, tensors, parameter) for c, s in zip(old_items, saved, strict=True))
    return copy.deepcopy(saved)


_SLOT_TAG = "gradstab-snapshot-slot"


def _slots(value: Any) -> list[Any]:
    """Every :class:`_Slot` in a decoded skeleton part (a list, dict or ``None``)."""
    if isinstance(value, _Slot):
        return [value]
    if isinstance(value, dict):
        return [slot for item in value.values() for slot in _slots(item)]
    if isinstance(value, (list, tuple)):
        return [slot for item in value for slot in _slots(item)]
    return []


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


_FileWriter = FileWriter  # the disk format lives in snapshot_disk.py


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
