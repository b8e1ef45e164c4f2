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

The bound and the options are in :mod:`~lightning_gradstab.guard.snapshot_budget`, the flat layout of the
copied state and its checks in :mod:`~lightning_gradstab.guard.snapshot_layout`, the file in
:mod:`~lightning_gradstab.guard.snapshot_disk`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gradstab.distributed import local_shard
from lightning_gradstab.guard.snapshot_budget import (
    SnapshotKeep,
    SnapshotLocation,
    default_max_bytes,
    disk_room,
    over_budget_message,
    validate_snapshot_options,
)
from lightning_gradstab.guard.snapshot_disk import (
    FileWriter,
    SnapshotUnusable,
    TensorPlace,
    leftover_files,
    new_run_token,
    read_tensors,
    snapshot_file_name,
    write_tensors,
)
from lightning_gradstab.guard.snapshot_layout import (
    check_model,
    check_optimizers,
    decode_checkpoint,
    encode_skeleton,
    flatten_state,
    model_entries,
    model_tensors,
    optimizer_parameters,
    raw_optimizer,
    restore_optimizer_states,
    restored_value,
    scaler_tensors,
)

_STATE_VERSION = 2  # layout of RollbackSnapshot.state_dict() (2: the model's tensor names and dtypes)


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
            this run and rank, mode 0600, see :mod:`lightning_gradstab.guard.snapshot_disk`); ``None``:
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
        self._offsets: list[TensorPlace] = []
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
        entries = model_entries(module)
        state: dict[str, Any] = {
            "model": [tensor for _, tensor in entries],
            "optimizers": None,
            "scaler": scaler_tensors(scaler),
        }
        if self.keep == "weights+optimizer":
            # every torch.optim optimizer keeps its per-parameter state in ``optimizer.state``
            state["optimizers"] = [
                [raw_optimizer(optimizer).state.get(p) or None for p in optimizer_parameters(optimizer)]
                for optimizer in optimizers
            ]
        live: list[Tensor] = []
        skeleton = flatten_state(state, live)
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
                for tensor, slot in zip(model_tensors(module), self._skeleton["model"], strict=True):
                    local_shard(tensor.detach()).copy_(tensors[slot.index])
                if self._skeleton["optimizers"] is not None:
                    restore_optimizer_states(optimizers, self._skeleton["optimizers"], tensors)
                if scaler is not None and self._skeleton["scaler"] is not None:
                    for name, slot in self._skeleton["scaler"].items():  # in place: no host read
                        setattr(scaler, name, restored_value(getattr(scaler, name, None), slot, tensors))
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
            "skeleton": encode_skeleton(self._skeleton),
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
        host, skeleton, saved_keep, step = decode_checkpoint(state)
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
        write_tensors(writer, live, self._offsets)

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
        return read_tensors(self._writer, self._offsets)

    def _verified_tensors(self, module: nn.Module, optimizers: Any) -> tuple[list[Tensor], Any]:
        """:meth:`_stored_tensors` after every check of :meth:`problem` passed (else :class:`SnapshotUnusable`)."""
        if self.location is None or self._skeleton is None:
            raise SnapshotUnusable("there is no snapshot")
        if not self.ready:
            raise SnapshotUnusable("its disk write is still in flight")
        check_model(module, self._skeleton, self._shapes())
        tensors, mapping = self._stored_tensors()
        if optimizers is not None and self._skeleton["optimizers"] is not None:
            check_optimizers(optimizers, self._skeleton["optimizers"])
        return tensors, mapping

    def _shapes(self) -> list[tuple[torch.dtype, torch.Size]]:
        if self.location == "memory":
            return [(tensor.dtype, tensor.shape) for tensor in self._host]
        return [(dtype, torch.Size(shape)) for _, dtype, shape in self._offsets]

    def _disk_room(self) -> int:
        """Bytes this rank's snapshot file may take (:func:`disk_room` of its folder)."""
        return disk_room(self.path.parent, self.local_processes)

    def _message_once(self, kind: str, needed: int, bound: int | None, room: int) -> None:
        if kind in self._warned or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
            return
        self._warned.add(kind)
        message = over_budget_message(kind, needed, self.keep, bound, room, self.path.parent)
        warnings.warn(f"lightning_gradstab: {message}", stacklevel=3)
