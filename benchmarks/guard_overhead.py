"""What does ExplosionGuard add to a training step, and what does a rollback snapshot cost?

In one process, the same training loop (``benchmarks/harness.py``, Adam) runs round-robin in these
configurations: ``baseline`` (no callbacks), ``monitor`` (``GradNormMonitor()``), ``monitor+guard``
(``GradNormMonitor()`` and ``ExplosionGuard(max_norm=None)``: a guard with nothing to act on, so what it costs
is measuring and deciding), ``monitor+guard default`` (``ExplosionGuard()``, whose Adam ceiling of 1.0 clips
every step of a workload whose healthy norm is above 1: the cost of acting) and ``clip_grad_norm_`` (a callback
calling ``torch.nn.utils.clip_grad_norm_(parameters, 1.0)``, what ``gradient_clip_val=1.0`` does: the reference
for the cost of a clip). The added time is measured inside the hooks that do the work (the mean per optimizer
step of ``on_before_optimizer_step`` of each callback) and reported as a multiple of the *floor*: one bare
``torch._foreach_norm`` over all gradients, measured in the same round-robin as the configurations. Both
callbacks read the same shared statistics, so the guard's own
share is its reduction, its single host read and the policy's few microseconds of Python. The guard
configurations' hook times leave out the steps on which the guard took or refreshed its rollback snapshot (early
in a run it does so whenever half the steps so far have passed, twice in the timed part of a 50-step fit; a
real run amortises them): what a snapshot costs is the snapshot table's, and the output says how many steps
were left out.

Two more configurations measure the Adam-state evidence (``lightning_gradstab.adam_state``): ``adam
evidence`` (a callback computing it on every step beside the default monitor: its hook time is one evidence
pass) and ``monitor+guard default +adam`` (``GradNormMonitor(adam_every_n_steps=ADAM_EVERY)`` with
``ExplosionGuard()``: the evidence amortised as a user would run it).

Two more measure the relative-update ceiling (``lightning_gradstab.update_ceiling``): ``update ceiling`` (a
callback measuring and bounding the step on every step beside the default monitor: the copy before the step and
the norms and shrink after it, timed together) and ``update ceiling check`` (the same on every
``CHECK_ROWS_EVERY``-th row, bounding nothing). The guard checks a run far from the ceiling once in
``UPDATE_CEILING_EVERY`` steps, and measures every step in full only while steps come within half of it.

The rollback snapshot (model and Adam state copied to CPU) is timed separately, with its size; snapshots
live in host memory, so peak accelerator memory is unchanged (checked when a GPU is present).

Usage::

    python benchmarks/guard_overhead.py                  # CPU, both workloads, markdown table
    python benchmarks/guard_overhead.py --repetitions 7 --steps 80
    python benchmarks/guard_overhead.py --device cuda --workloads mlp gpt-small
    python benchmarks/guard_overhead.py --output benchmarks/results/guard-overhead-cpu-v4.md --note "..."

``--output`` writes the tables into a markdown file headed by the command, the date, the machine and the commit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.harness import (
    WORKLOADS,
    ForeachNormFloor,
    HookClock,
    StepTiming,
    Workload,
    interleaved_medians,
    machine_description,
    require_device,
    time_fit,
)
from lightning_gradstab import ExplosionGuard, GradNormMonitor
from lightning_gradstab.adam_state import AdamStateTracker
from lightning_gradstab.callbacks._guard_update import CHECK_ROWS_EVERY, UPDATE_CEILING_EVERY
from lightning_gradstab.callbacks._shared import gradient_stats
from lightning_gradstab.guard.tuple_snapshot import snapshot_training_state
from lightning_gradstab.update_ceiling import RelativeUpdateCeiling

ADAM_EVERY = 100
"""The evidence interval of the ``monitor+guard default +adam`` configuration (``adam_every_n_steps``)."""


class AdamEvidenceEveryStep(Callback):
    """Computes the Adam-state evidence on every optimizer step (after the monitor's shared statistics), so its
    hook time is the cost of one evidence pass."""

    def __init__(self) -> None:
        self.trackers: dict[int, AdamStateTracker] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        raw = getattr(optimizer, "_optimizer", optimizer)
        tracker = self.trackers.setdefault(id(raw), AdamStateTracker(raw))
        tracker.compute(gradient_stats(trainer, pl_module, raw))


class UpdateCeilingEveryStep(Callback):
    """Measures (and bounds) the relative update on every optimizer step: the copy in ``on_before_optimizer_step``
    and the norms and shrink in an optimizer step post-hook, both timed; ``durations`` holds their sum per step."""

    def __init__(self, sample_every: int = 1) -> None:
        self.ceiling = RelativeUpdateCeiling()
        self.sample_every = sample_every
        self.durations: list[float] = []
        self._hooked: set[int] = set()
        self._begun = 0.0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        raw = getattr(optimizer, "_optimizer", optimizer)
        if id(raw) not in self._hooked:
            self._hooked.add(id(raw))
            raw.register_step_post_hook(lambda opt, args, kwargs: self._end())
        start = time.perf_counter()
        parameters = [p for group in raw.param_groups for p in group["params"] if p.grad is not None]
        self.ceiling.begin(parameters, sample_every=self.sample_every)
        _synchronize()
        self._begun = time.perf_counter() - start

    def _end(self) -> None:
        start = time.perf_counter()
        self.ceiling.end()
        _synchronize()
        self.durations.append(self._begun + time.perf_counter() - start)

    def mean_seconds(self, skip: int) -> float:
        kept = self.durations[skip:]
        return statistics.fmean(kept) if kept else 0.0


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class GuardClock:
    """Times the guard's ``on_before_optimizer_step`` like :class:`~benchmarks.harness.HookClock`, and marks the
    calls that took or refreshed the rollback snapshot: early in a run the guard refreshes it whenever half the
    steps so far have passed (twice in a 50-step fit), a copy of the model and Adam state that costs tens of
    milliseconds once and ~0.1 ms per step amortised over a real run. Those calls are left out of the per-step
    hook times; the snapshot's own cost is the snapshot table's."""

    def __init__(self, guard: ExplosionGuard) -> None:
        self.durations: list[float] = []
        self.snapshot_calls: list[bool] = []
        inner = guard.on_before_optimizer_step

        def timed(*args, **kwargs):
            before = guard.snapshot_step
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = inner(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.durations.append(time.perf_counter() - start)
            self.snapshot_calls.append(guard.snapshot_step != before)
            return result

        guard.on_before_optimizer_step = timed

    def kept(self, skip: int) -> list[bool]:
        """Which calls after the first ``skip`` count: those that took no snapshot."""
        return [not snapshot for snapshot in self.snapshot_calls[skip:]]

    def mean_seconds(self, skip: int) -> float:
        kept = [d for d, keep in zip(self.durations[skip:], self.kept(skip), strict=True) if keep]
        return statistics.fmean(kept) if kept else 0.0

    def snapshot_steps(self, skip: int) -> int:
        return sum(self.snapshot_calls[skip:])


def _mean_where(durations: list[float], kept: list[bool], skip: int) -> float:
    """Mean of ``durations`` after the first ``skip``, over the calls ``kept`` marks (the guard's non-snapshot
    steps: the same steps for the monitor beside it)."""
    values = [d for d, keep in zip(durations[skip:], kept, strict=False) if keep]
    return statistics.fmean(values) if values else 0.0


class ClipGradNorm(Callback):
    """``torch.nn.utils.clip_grad_norm_(parameters, max_norm)`` before every optimizer step (Lightning's
    ``gradient_clip_val`` does the same, outside any callback hook, so it cannot be timed in place)."""

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = max_norm

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        torch.nn.utils.clip_grad_norm_(pl_module.parameters(), self.max_norm)


def measure(
    workload: Workload, repetitions: int, steps: int, accelerator: str
) -> tuple[dict[str, StepTiming], float, float, float]:
    """Median step time and median per-step time inside the callbacks' hooks, per configuration, the median
    time inside the guard's own hook when it runs beside the monitor (its share of the cost), the fraction
    of steps the default guard's ceiling clipped, and the median number of timed steps per fit that took a
    rollback snapshot (left out of the guard configurations' hook times)."""
    guard_hook_seconds: list[float] = []
    ceiling_fractions: list[float] = []
    update_ceiling_seconds: list[float] = []
    update_check_seconds: list[float] = []
    snapshot_steps: list[int] = []

    def baseline() -> StepTiming:
        return time_fit(workload, [], steps=steps, accelerator=accelerator)

    def monitor() -> StepTiming:
        callback = GradNormMonitor()
        return time_fit(workload, [callback], timed_callback=callback, steps=steps, accelerator=accelerator)

    def with_guard(guard: ExplosionGuard, monitor: GradNormMonitor | None = None) -> tuple[StepTiming, float]:
        """The step timing with monitor + guard hooks together, and the guard's own hook alone (both over the
        steps that took no rollback snapshot, see :class:`GuardClock`)."""
        monitor = monitor or GradNormMonitor()
        monitor_clock = HookClock(monitor, "on_before_optimizer_step")
        guard_clock = GuardClock(guard)
        timing = time_fit(workload, [monitor, guard], steps=steps, accelerator=accelerator)
        skip = 10  # time_fit's warm-up
        own = guard_clock.mean_seconds(skip)
        monitor_seconds = _mean_where(monitor_clock.durations, guard_clock.kept(skip), skip)
        snapshot_steps.append(guard_clock.snapshot_steps(skip))
        return StepTiming(timing.step_seconds, own + monitor_seconds, timing.peak_memory_bytes), own

    def monitor_and_guard() -> StepTiming:
        timing, own = with_guard(ExplosionGuard(console_summary=False, max_norm=None))
        guard_hook_seconds.append(own)
        return timing

    def monitor_and_default_guard() -> StepTiming:
        guard = ExplosionGuard(console_summary=False)
        timing, _ = with_guard(guard)
        ceiling_fractions.append(guard.policy().counts.get("max_norm", 0) / max(1, guard.policy().steps))
        return timing

    def monitor_and_default_guard_with_adam() -> StepTiming:
        timing, _ = with_guard(ExplosionGuard(console_summary=False), GradNormMonitor(adam_every_n_steps=ADAM_EVERY))
        return timing

    def adam_evidence() -> StepTiming:
        evidence = AdamEvidenceEveryStep()
        return time_fit(
            workload, [GradNormMonitor(), evidence], timed_callback=evidence, steps=steps, accelerator=accelerator
        )

    def update_ceiling() -> StepTiming:
        callback = UpdateCeilingEveryStep()
        timing = time_fit(workload, [GradNormMonitor(), callback], steps=steps, accelerator=accelerator)
        update_ceiling_seconds.append(callback.mean_seconds(10))  # after time_fit's warm-up
        return timing

    def update_check() -> StepTiming:
        callback = UpdateCeilingEveryStep(sample_every=CHECK_ROWS_EVERY)
        timing = time_fit(workload, [GradNormMonitor(), callback], steps=steps, accelerator=accelerator)
        update_check_seconds.append(callback.mean_seconds(10))
        return timing

    def clip() -> StepTiming:
        callback = ClipGradNorm()
        return time_fit(workload, [callback], timed_callback=callback, steps=steps, accelerator=accelerator)

    def floor() -> StepTiming:  # interleaved with the others, so the machine's load hits it alike
        callback = ForeachNormFloor()
        return time_fit(workload, [callback], timed_callback=callback, steps=steps, accelerator=accelerator)

    timings = interleaved_medians(
        {
            "floor": floor,
            "baseline": baseline,
            "monitor": monitor,
            "monitor+guard": monitor_and_guard,
            "monitor+guard default": monitor_and_default_guard,
            "monitor+guard default +adam": monitor_and_default_guard_with_adam,
            "adam evidence": adam_evidence,
            "update ceiling": update_ceiling,
            "update ceiling check": update_check,
            "clip_grad_norm_": clip,
        },
        repetitions,
    )
    return (
        timings,
        statistics.median(guard_hook_seconds),
        statistics.median(ceiling_fractions),
        statistics.median(snapshot_steps),
        statistics.median(update_ceiling_seconds),
        statistics.median(update_check_seconds),
    )


def snapshot_cost(workload: Workload, device: str, repeats: int = 5) -> tuple[float, float, int, int]:
    """Seconds of the first rollback snapshot (model + Adam state, allocates host memory) and the median
    seconds of a refresh (what the guard does every ``snapshot_every`` healthy steps: a copy into the same
    host buffers), its bytes, and the change in peak accelerator memory it caused (0 on CPU)."""
    torch.manual_seed(0)
    model = workload.make_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs, targets = (t.to(device) for t in workload.make_batch())
    workload.loss(model(inputs), targets).backward()
    optimizer.step()  # Adam's moments exist: the snapshot is full size
    peak_before = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    start = time.perf_counter()
    snapshot = snapshot_training_state(model, [optimizer])
    first = time.perf_counter() - start
    refreshes = []
    for _ in range(repeats):
        start = time.perf_counter()
        snapshot = snapshot_training_state(model, [optimizer], into=snapshot)
        refreshes.append(time.perf_counter() - start)
    peak_after = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return first, statistics.median(refreshes), _bytes(snapshot), peak_after - peak_before


def _bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--workloads", nargs="+", choices=sorted(WORKLOADS), default=["mlp", "gpt"], help="gpt-small: ~110M params"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps a shared box quiet)")
    parser.add_argument("--output", type=Path, help="also write the tables into this markdown file")
    parser.add_argument("--title", default="ExplosionGuard overhead", help="the --output file's heading")
    parser.add_argument("--note", default="", help="a line about the run for the --output file (load, ...)")
    args = parser.parse_args(argv)
    if args.output is None:
        run(args)
        return
    captured = _Tee()
    with contextlib.redirect_stdout(captured):
        run(args)
    command = "python benchmarks/guard_overhead.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    header = [
        f"# {args.title}",
        "",
        f"- command: `{command.strip()}`",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; code: git commit {_commit()}",
    ]
    if args.note:
        header.append(f"- note: {args.note}")
    args.output.write_text("\n".join(header) + "\n\n" + captured.getvalue())


class _Tee(io.StringIO):
    """Keeps what is printed and passes it on to the terminal."""

    def write(self, text: str) -> int:
        sys.__stdout__.write(text)
        return super().write(text)


def _commit() -> str:
    """The checked-out commit, marked when the working tree differs from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def run(args: argparse.Namespace) -> None:
    """Measure and print every table."""
    require_device(args.device)
    torch.set_num_threads(args.threads)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    print(f"Machine: {machine_description()}; {args.repetitions} interleaved repetitions x {args.steps} steps\n")
    print(
        "| workload | tensors | params | floor (ms) | monitor hook (ms, x floor) | monitor+guard hooks (ms, x floor) "
        "| guard's own hook (ms, x floor) | step ratio monitor / +guard vs baseline |"
    )
    print("|---|---|---|---|---|---|---|---|")
    acting = []
    measured_every_step: dict[str, StepTiming] = {}
    snapshots, peaks, excluded = [], [], []
    for workload in (WORKLOADS[key]() for key in args.workloads):
        timings, guard_seconds, ceiling_fraction, snapshot_steps, update_seconds, check_seconds = measure(
            workload, args.repetitions, args.steps, accelerator
        )
        excluded.append((workload, snapshot_steps))
        floor = timings["floor"].hook_seconds
        base, monitor, both = timings["baseline"], timings["monitor"], timings["monitor+guard"]
        default, clip = timings["monitor+guard default"], timings["clip_grad_norm_"]
        evidence, with_adam = timings["adam evidence"], timings["monitor+guard default +adam"]
        measured_every_step[workload.name] = timings["update ceiling"]
        acting.append(
            (workload, floor, base, default, clip, ceiling_fraction, evidence, with_adam, update_seconds, check_seconds)
        )
        print(
            f"| {workload.name} | {workload.parameter_tensors()} | {workload.parameter_count() / 1e6:.1f}M "
            f"| {floor * 1e3:.3f} | {monitor.hook_seconds * 1e3:.3f} ({monitor.hook_seconds / floor:.2f}x) "
            f"| {both.hook_seconds * 1e3:.3f} ({both.hook_seconds / floor:.2f}x) "
            f"| {guard_seconds * 1e3:.3f} ({guard_seconds / floor:.2f}x) "
            f"| {monitor.step_seconds / base.step_seconds:.3f} / {both.step_seconds / base.step_seconds:.3f} |"
        )
        snapshots.append((workload, *snapshot_cost(workload, args.device)))
        peaks.append((workload, base, monitor, both))
    print(
        "\nHook times with the guard leave out the timed steps on which it took or refreshed its rollback snapshot "
        "(early in a run, whenever half the steps so far have passed; their cost is the snapshot table's): "
        + ", ".join(f"{workload.name}: {count:g} of {args.steps} per fit" for workload, count in excluded)
        + "."
    )
    print(
        "\n| workload | steps clipped at the Adam ceiling | monitor+guard default hooks (ms, x floor) "
        "| clip_grad_norm_(1.0) hook (ms, x floor) | step ratio guard default / clip_grad_norm_ vs baseline |"
    )
    print("|---|---|---|---|---|")
    for workload, floor, base, default, clip, fraction, *_ in acting:
        print(
            f"| {workload.name} | {fraction:.0%} "
            f"| {default.hook_seconds * 1e3:.3f} ({default.hook_seconds / floor:.2f}x) "
            f"| {clip.hook_seconds * 1e3:.3f} ({clip.hook_seconds / floor:.2f}x) "
            f"| {default.step_seconds / base.step_seconds:.3f} / {clip.step_seconds / base.step_seconds:.3f} |"
        )
    print(
        f"\n| workload | one Adam-evidence pass (ms, x floor) | amortised at every {ADAM_EVERY} steps (x floor) "
        f"| monitor(adam_every_n_steps={ADAM_EVERY}) + default guard hooks (ms, x floor) |"
    )
    print("|---|---|---|---|")
    for workload, floor, *_, evidence, with_adam, _update, _check in acting:
        print(
            f"| {workload.name} | {evidence.hook_seconds * 1e3:.3f} ({evidence.hook_seconds / floor:.1f}x) "
            f"| {evidence.hook_seconds / floor / ADAM_EVERY:.2f}x "
            f"| {with_adam.hook_seconds * 1e3:.3f} ({with_adam.hook_seconds / floor:.2f}x) |"
        )
    print(
        f"\n| workload | one relative-update measurement (ms, x floor) | step ratio measured every step vs baseline "
        f"| one check of every {CHECK_ROWS_EVERY}th row (ms, x floor) "
        f"| a check every {UPDATE_CEILING_EVERY} steps, amortised (x floor) |"
    )
    print("|---|---|---|---|---|")
    for workload, floor, base, *_, update_seconds, check_seconds in acting:
        ceiling_timing = measured_every_step[workload.name]
        print(
            f"| {workload.name} | {update_seconds * 1e3:.3f} ({update_seconds / floor:.1f}x) "
            f"| {ceiling_timing.step_seconds / base.step_seconds:.3f} "
            f"| {check_seconds * 1e3:.3f} ({check_seconds / floor:.2f}x) "
            f"| {check_seconds / floor / UPDATE_CEILING_EVERY:.3f}x |"
        )
    snapshot_every = ExplosionGuard().config.resolved("snapshot_every")
    print(
        f"\n| workload | first snapshot (ms) | refresh (ms) | refresh per step at snapshot_every={snapshot_every} "
        "(ms) | snapshot size (MB, host) | peak accelerator memory change |"
    )
    print("|---|---|---|---|---|---|")
    for workload, first, refresh, size, peak_change in snapshots:
        peak = f"{peak_change} B" if args.device == "cuda" else "n/a (CPU run)"
        print(
            f"| {workload.name} | {first * 1e3:.1f} | {refresh * 1e3:.1f} | {refresh * 1e3 / snapshot_every:.3f} "
            f"| {size / 2**20:.1f} | {peak} |"
        )
    if args.device == "cuda":
        print("\n| workload | peak accelerator memory (MiB) baseline | monitor | monitor+guard |")
        print("|---|---:|---:|---:|")
        for workload, *timings in peaks:
            print(f"| {workload.name} | " + " | ".join(f"{t.peak_memory_bytes / 2**20:.1f}" for t in timings) + " |")


if __name__ == "__main__":
    main()
