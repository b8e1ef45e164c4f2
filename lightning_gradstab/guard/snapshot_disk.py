"""The file format of a disk rollback snapshot: private files that belong to one run, verified before use.

A snapshot file sits next to the user's own files (a log directory, a shared scratch folder), often in a folder
that several runs share (a sweep, two terminals, one ``default_root_dir``). So every file is

- named for its run and rank (``gradstab-rollback-<pid>-<random>-rank<r>.bin``): two runs never share a file;
- created exclusively without following links (``O_CREAT | O_EXCL | O_NOFOLLOW``), mode 0600, under a private
  temporary name, and renamed into place once complete (a link planted at either name is never written
  through; a complete file is the only thing ever found at the final name);
- described by its size, inode and a CRC-32 of its payload, checked before a restore reads it (a file removed,
  truncated or replaced is refused, not loaded);
- deleted only by the process that created it: when the snapshot is replaced or closed, at the end of ``fit``,
  on an exception, and at interpreter exit for whatever is still left (:func:`remove_own_files`). A file left by
  a killed process (SIGKILL, a power cut) is listed by :func:`leftover_files` so the user is told where it is;
  it is never deleted by another run, which cannot know whether its owner is still alive.

The format is the tensors' raw bytes, each at a 64-byte aligned offset; the layout (offsets, dtypes, shapes)
stays in the process that wrote it: the file is a spill of host memory, not an exchange format.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import queue
import re
import secrets
import threading
import zlib
from pathlib import Path

import torch
from torch import Tensor

FILE_PREFIX = "gradstab-rollback-"
"""Every snapshot file's name starts with this; the rest is ``<pid>-<random>-rank<r>.bin``."""

_NAME = re.compile(r"^\.?gradstab-rollback-(?P<pid>\d+)-[0-9a-f]+-rank\d+\.bin(\.tmp)?$")
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
FILE_MODE = 0o600
"""Snapshot files are readable and writable by their owner only: they hold the model's weights."""

_ALIGNMENT = 64  # bytes: every tensor in a snapshot file starts on a boundary any dtype can be viewed from

TensorPlace = tuple[int, torch.dtype, torch.Size]
"""Where one tensor of a snapshot sits in its file: ``(offset, dtype, shape)``."""

_OWN_FILES: set[Path] = set()  # files this process created and has not deleted yet
_OWN_LOCK = threading.Lock()


def new_run_token() -> str:
    """A token unique to one run of one process: its pid (to tell a dead owner's files) and 32 random bits."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def snapshot_file_name(run_token: str, rank: int) -> str:
    """The file name of rank ``rank``'s snapshot in the run ``run_token`` (see :func:`new_run_token`)."""
    return f"{FILE_PREFIX}{run_token}-rank{rank}.bin"


def _register(path: Path) -> None:
    with _OWN_LOCK:
        _OWN_FILES.add(path)


def remove_own_file(path: Path) -> None:
    """Delete ``path`` if this process created it (a file of another run is never touched)."""
    with _OWN_LOCK:
        if path not in _OWN_FILES:
            return
        _OWN_FILES.discard(path)
    with contextlib.suppress(OSError):  # a folder removed under us, a read-only disk: nothing left to do
        path.unlink(missing_ok=True)


def remove_own_files() -> None:
    """Delete every snapshot file this process created and still holds (run at interpreter exit)."""
    with _OWN_LOCK:
        paths = list(_OWN_FILES)
    for path in paths:
        remove_own_file(path)


atexit.register(remove_own_files)


def leftover_files(directory: Path) -> list[Path]:
    """Snapshot files in ``directory`` whose creating process is no longer alive on this host (left by a
    SIGKILL or a crash), oldest name first. Files of live processes (another run in the same folder) are not
    listed; files on a shared filesystem whose pid belongs to another host may be, which only costs a message."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        match = _NAME.match(name)
        if match is None or int(match["pid"]) == os.getpid():
            continue
        if not _alive(int(match["pid"])):
            found.append(directory / name)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


class FileWriter:
    """Writes pieces of a snapshot into a private file from a background thread, through staging buffers.

    The training thread asks :meth:`staging` for a host buffer, copies a tensor into it and queues it with
    :meth:`put`; the writer writes it and hands the buffer back to the pool for the next piece. The pool never
    grows past ``max_in_flight`` bytes (one piece larger than that still gets a buffer of its own), so the host
    RAM the copies use stays under the bound: a fresh allocation per piece would not, since the allocator does
    not reliably reuse the blocks another thread freed. ``staging`` waits only while the pool is full.

    The file is created as ``.<name>.tmp`` (exclusively, no links followed, mode 0600), written, flushed and
    renamed to ``path``; :attr:`checksum`, :attr:`size` and :attr:`inode` then describe it for
    :func:`open_verified`.
    """

    def __init__(self, path: Path, max_in_flight: int | None) -> None:
        self.path = path
        self.temporary = path.with_name(f".{path.name}.tmp")
        self.max_in_flight = max_in_flight
        self.pending_bytes = 0  # bytes of staging buffers allocated (in flight or waiting in the pool)
        self.error: BaseException | None = None
        self.checksum = 0
        self.size = 0
        self.inode: int | None = None
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
        """Queue the first ``nbytes`` of a :meth:`staging` buffer, to be written at ``offset`` (increasing)."""
        self._queue.put((offset, buffer, nbytes))

    def finish(self) -> None:
        """No more pieces: the file is flushed and renamed into place."""
        self._queue.put(None)

    def _run(self) -> None:
        finished = False  # ``finish`` was seen
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.temporary, _CREATE_FLAGS, FILE_MODE)
            _register(self.temporary)
            with os.fdopen(descriptor, "wb") as stream:
                while not (finished := (item := self._queue.get()) is None):
                    offset, buffer, nbytes = item
                    if nbytes:
                        view = buffer[:nbytes].numpy().data  # memoryview(array), typed as such in numpy
                        stream.seek(offset)
                        stream.write(view)
                        self.checksum = zlib.crc32(view, self.checksum)
                        self.size = max(self.size, offset + nbytes)
                        del view
                    del item
                    with self._space:
                        self._pool.append(buffer)
                        self._space.notify_all()
                    del buffer
                stream.flush()
                self.inode = os.fstat(stream.fileno()).st_ino
            os.rename(self.temporary, self.path)  # atomic: the final name only ever holds a complete file
            with _OWN_LOCK:
                _OWN_FILES.discard(self.temporary)
                _OWN_FILES.add(self.path)
        except BaseException as error:  # reported by the next take/restore; training goes on
            with self._space:
                self.error = error
                self._space.notify_all()  # ``staging`` stops waiting for a writer that is gone
            remove_own_file(self.temporary)
            remove_own_file(self.path)
            while not finished:  # drain until ``finish``
                finished = self._queue.get() is None
        finally:
            with self._space:
                self._pool.clear()
                self.pending_bytes = 0
            return_freed_memory()
            with self._space:
                self.done.set()
                self._space.notify_all()

    def intact(self) -> bool:
        """Whether the finished file is still where it was written, with its size (a ``stat``: no read)."""
        try:
            status = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return status.st_size == self.size and status.st_ino == self.inode

    def remove(self) -> None:
        """Delete the file (and a temporary left by a failed write), if this process created them."""
        remove_own_file(self.temporary)
        remove_own_file(self.path)


class SnapshotUnusable(ValueError):
    """A snapshot that cannot be restored: its file is gone, changed or corrupt, or it does not fit the model."""


def open_verified(writer: FileWriter, pieces: list[tuple[int, int]]) -> mmap.mmap | None:
    """A private (copy-on-write) mapping of ``writer``'s file after checking that it is the file written (same
    inode, same size, no link) and that the CRC-32 of its ``(offset, nbytes)`` pieces matches; raises
    :class:`SnapshotUnusable` saying what is wrong. ``None`` for an empty payload."""
    if writer.size == 0:
        return None
    try:
        descriptor = os.open(writer.path, _READ_FLAGS)
    except OSError as error:
        raise SnapshotUnusable(f"its file {str(writer.path)!r} cannot be opened ({error.strerror})") from None
    try:
        status = os.fstat(descriptor)
        if status.st_ino != writer.inode or status.st_size != writer.size:
            raise SnapshotUnusable(
                f"its file {str(writer.path)!r} was replaced or changed size ({status.st_size} bytes, "
                f"{writer.size} written)"
            )
        mapping = mmap.mmap(descriptor, writer.size, access=mmap.ACCESS_COPY)
    finally:
        os.close(descriptor)
    checksum = 0
    for offset, nbytes in pieces:
        if nbytes:
            checksum = zlib.crc32(memoryview(mapping)[offset : offset + nbytes], checksum)
    if checksum != writer.checksum:
        raise SnapshotUnusable(f"its file {str(writer.path)!r} does not hold what was written (CRC-32 mismatch)")
    return mapping


def write_tensors(writer: FileWriter, tensors: list[Tensor], places: list[TensorPlace]) -> None:
    """Queue ``tensors`` to ``writer`` one after the other, each at the next 64-byte aligned offset, appending
    where each goes to ``places``, then finish the file. Each copy waits only for a staging buffer (see
    :meth:`FileWriter.staging`); after a failed write the rest is not copied."""
    offset = 0
    for tensor in tensors:
        offset = -(-offset // _ALIGNMENT) * _ALIGNMENT
        places.append((offset, tensor.dtype, tensor.shape))
        if writer.error is not None:  # the file cannot be written: no point copying the rest
            break
        buffer = writer.staging(tensor.nbytes)
        buffer[: tensor.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        writer.put(offset, buffer, tensor.nbytes)
        del buffer
        offset += tensor.nbytes
    writer.finish()


def read_tensors(writer: FileWriter, places: list[TensorPlace]) -> tuple[list[Tensor], mmap.mmap | None]:
    """The tensors :func:`write_tensors` wrote, as views of the verified file (:func:`open_verified`: a
    copy-on-write mapping, read as the views are copied) and the mapping they view (keep it while they are used).
    Raises :class:`SnapshotUnusable`."""
    pieces = [(offset, torch.Size(shape).numel() * dtype.itemsize) for offset, dtype, shape in places]
    mapping = open_verified(writer, pieces)
    tensors = []
    for (offset, dtype, shape), (_, size) in zip(places, pieces, strict=True):
        if size == 0 or mapping is None:
            tensors.append(torch.empty(shape, dtype=dtype))
        else:
            tensors.append(torch.frombuffer(mapping, dtype=torch.uint8, count=size, offset=offset).view(dtype)
                           .reshape(shape))
    return tensors, mapping


def return_freed_memory() -> None:
    """Hand the freed copies back to the OS: glibc keeps large freed blocks in its heap (its mmap threshold
    grows after the first free), so the resident set would stay as if the copies were still held."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
