"""What a rollback snapshot may keep, where, and how many bytes: its options and its memory and disk budget.

A snapshot of weights and Adam's moments is 3x the weights' bytes: 84 GB per rank for a 7B-parameter fp32
model, which no host holds for every rank of a node. So a snapshot has a bound in host RAM
(:func:`default_max_bytes`: a share of the host's RAM divided among the ranks on it) and, above it, goes to a
file that may take a share of the free disk space (:func:`disk_room`). Both shares are module constants;
:func:`validate_snapshot_options` checks the options a callback passes on, naming its own argument.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

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



def disk_room(folder: Path, local_processes: int | None = None) -> int:
    """Bytes one rank's snapshot file in ``folder`` may take: ``DISK_SHARE`` of its share of the free space (the
    rest is left to checkpoints and logs); the previous file is deleted before this is asked, so its bytes count
    as free. A folder not created yet is measured at its nearest existing parent; 0 if none can be measured."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return 0
    processes = local_processes if local_processes is not None else local_process_count()
    return int(DISK_SHARE * free / max(processes, 1))


def over_budget_message(kind: str, needed: int, keep: str, bound: int | None, room: int, folder: Path) -> str:
    """What a snapshot of ``needed`` bytes per rank says when it is over its ``bound``: ``kind="to disk"``, it is
    written to a file in ``folder`` instead; otherwise (``"no room"``) it is above the disk's ``room`` as well
    and none is kept. Each says what to change."""
    limit = "no bound" if bound is None else f"max_bytes={bound} ({format_bytes(bound)})"
    if kind == "to disk":
        return (
            f"the rollback snapshot needs {format_bytes(needed)} per rank ({keep}), above {limit}; it is "
            f"written to {str(folder)!r} by a background thread instead of being held in RAM. Raise "
            "max_bytes, choose keep='weights', or shard the model (FSDP: each rank keeps its shard) to keep it "
            "in memory."
        )
    return (
        f"the rollback snapshot needs {format_bytes(needed)} per rank ({keep}), above {limit} and "
        f"above {format_bytes(room)}, this rank's half of the free space in {str(folder)!r}: NO "
        "snapshot is kept, so a rollback cannot happen. Choose keep='weights', shard the model, or point "
        "the snapshot directory at a larger disk."
    )
