"""How much host memory does a rollback snapshot hold, and how much more does a restore need for a moment?

For MLPs of about 1M, 10M and 50M parameters trained one Adam step (so the moments exist), each snapshot
mode runs in a fresh process and reports:

- ``state``: bytes of the tensors the mode copies (parameters, buffers, Adam's moments and step counters);
- ``held``: bytes the snapshot holds in host RAM once taken (``RollbackSnapshot.nbytes``; the disk mode's
  copies are freed as they are written);
- ``RSS after take``: growth of the process's resident set from before the first snapshot to after it;
- ``peak refresh`` / ``peak restore``: the resident high-water mark during a second snapshot (a refresh) /
  a restore, above the resident set just before it (``/proc/self/status`` ``VmHWM``, reset through
  ``/proc/self/clear_refs``). For the disk mode it includes the snapshot file's pages, mapped while they are
  copied back;
- ``refresh`` / ``restore`` times (ms; for the disk mode until the file is complete), on a shared machine.

Resident-set deltas can be below ``held``: the allocator hands out memory freed earlier (Adam's temporaries)
without growing the process. ``held`` is exact.

Modes: ``weights`` and ``weights+optimizer`` in memory; ``disk`` (``weights+optimizer`` in a file, the
default ``max_bytes``: every copy may be in flight at once, so the step never waits for the disk) and the
same with ``max_bytes`` of 32 MiB (the step waits while 32 MiB of copies are unwritten); and
``state_dict (before)``, the tuple snapshot of ``snapshot_training_state``, whose restore went through
``optimizer.load_state_dict`` on a copy of the state.

Usage::

    python benchmarks/snapshot_memory.py                      # table on stdout
    python benchmarks/snapshot_memory.py --output benchmarks/results/snapshot-memory-cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"1M": (512, 4), "10M": (1024, 10), "50M": (2048, 12)}  # (width, Linear layers)
BOUNDED_DISK = "disk, max_bytes=32 MiB"
MODES = ("weights", "weights+optimizer", "disk", BOUNDED_DISK, "state_dict (before)")


def _status() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(rest.split()[0]) * 1024
    return fields


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident set


def _peak_above(before: int) -> int:
    return _status()["VmHWM"] - before


def measure_one(size: str, mode: str, directory: str) -> dict[str, float]:
    """Run in a fresh process: one model, one mode."""
    import torch
    from torch import nn

    from lightning_gradstab.guard.snapshot import RollbackSnapshot
    from lightning_gradstab.guard.tuple_snapshot import restore_training_state, snapshot_training_state

    torch.set_num_threads(1)
    torch.manual_seed(0)
    width, layers = SIZES[size]
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(8, width)).square().mean().backward()
    optimizer.step()  # gradients stay allocated, so freed memory does not blur the resident-set deltas
    parameters = sum(p.numel() for p in model.parameters())

    rss_before = _status()["VmRSS"]
    if mode == "state_dict (before)":
        tuple_snapshot = snapshot_training_state(model, [optimizer])
        state = held = sum(
            t.nbytes for t in [*tuple_snapshot[0].values(), *_tensors(tuple_snapshot[1])] if isinstance(t, torch.Tensor)
        )
    else:
        keep = "weights" if mode == "weights" else "weights+optimizer"
        location = "disk" if mode.startswith("disk") else "memory"
        max_bytes = 32 * 2**20 if mode == BOUNDED_DISK else "auto"
        snapshot = RollbackSnapshot(keep=keep, location=location, max_bytes=max_bytes, directory=directory)
        snapshot.take(model, [optimizer])
        snapshot._wait_for_write()
        state, held = snapshot.state_bytes, snapshot.nbytes
    rss_after = _status()["VmRSS"]

    before = _status()["VmRSS"]
    _reset_peak()
    start = time.perf_counter()
    if mode == "state_dict (before)":
        snapshot_training_state(model, [optimizer], into=tuple_snapshot)
    else:
        snapshot.take(model, [optimizer])  # a refresh: what the guard does every ``snapshot_every`` steps
        snapshot._wait_for_write()
    take_seconds = time.perf_counter() - start
    peak_take = _peak_above(before)

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training moved on
    before = _status()["VmRSS"]
    _reset_peak()
    start = time.perf_counter()
    if mode == "state_dict (before)":
        restore_training_state(model, [optimizer], tuple_snapshot)
    else:
        snapshot.restore(model, [optimizer])
    restore_seconds = time.perf_counter() - start
    peak_restore = _peak_above(before)
    if mode.startswith("disk"):
        snapshot.close()
    return {
        "parameters": parameters,
        "state": state,
        "held": held,
        "rss_take": rss_after - rss_before,
        "peak_take": peak_take,
        "peak_restore": peak_restore,
        "take_ms": 1e3 * take_seconds,
        "restore_ms": 1e3 * restore_seconds,
    }


def _tensors(value: object) -> list:
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return [value]


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def machine() -> str:
    import lightning
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from lightning_gradstab.guard.snapshot_budget import format_bytes, host_memory_bytes

    total, _ = host_memory_bytes()
    return (
        f"{cpu}, {os.cpu_count()} cores, {format_bytes(total)} RAM; torch {torch.__version__}, "
        f"lightning {lightning.__version__}, 1 thread"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--directory", default=None, help="folder of the disk mode's file (default: a temp dir)")
    parser.add_argument("--output", default=None, help="also write the results (command, machine, table) here")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(*args.one, args.directory)))
        return
    directory = args.directory or tempfile.mkdtemp(prefix="gradstab-snapshot-bench-")
    lines = [
        "| params | mode | state (MiB) | held (MiB) | RSS after take (MiB) | peak refresh (MiB) "
        "| peak restore (MiB) | refresh (ms) | restore (ms) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in args.sizes:
        for mode in args.modes:
            command = [sys.executable, __file__, "--one", size, mode, "--directory", directory]
            environment = {**os.environ, "OMP_NUM_THREADS": "1"}
            output = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
            r = json.loads(output.strip().splitlines()[-1])
            lines.append(
                f"| {r['parameters'] / 1e6:.1f}M | {mode} | {_mib(r['state'])} | {_mib(r['held'])} "
                f"| {_mib(r['rss_take'])} | {_mib(r['peak_take'])} | {_mib(r['peak_restore'])} "
                f"| {r['take_ms']:.0f} | {r['restore_ms']:.0f} |"
            )
            print(lines[-1], flush=True)
    invocation = "python benchmarks/snapshot_memory.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = "\n".join(
        [
            f"# Rollback snapshot host memory, {datetime.date.today().isoformat()}",
            "",
            f"`{invocation.strip()}`",
            "",
            f"Machine: {machine()}. Disk mode file system: {_filesystem(directory)}.",
            "MLPs of width x width Linear layers after one Adam step; each row is a fresh process.",
            "",
            *lines,
            "",
        ]
    )
    print()
    print(report)
    if args.output:
        Path(args.output).write_text(report)


def _filesystem(directory: str) -> str:
    try:
        output = subprocess.run(["df", "-T", directory], capture_output=True, text=True, check=True).stdout
        return output.splitlines()[1].split()[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


if __name__ == "__main__":
    main()
