"""What does measuring gradients cost? GradNormMonitor vs Lightning's documented recipe vs nothing.

In one process, the same training loop runs round-robin in four configurations:

- ``baseline``: no gradient logging;
- ``recipe``: Lightning's documented ``self.log_dict(grad_norm(self, 2))`` in ``on_before_optimizer_step``
  (per-parameter norms and the total, every step);
- ``monitor``: ``GradNormMonitor()`` with its defaults;
- ``monitor-per-param``: ``GradNormMonitor(group_by="parameter", log_every_n_steps=1)``, the same content as
  the recipe.

The added time is measured inside the hook that does the work (``on_before_optimizer_step`` of the monitor,
or of the LightningModule for the recipe; CUDA-synchronised), as a mean per optimizer step, so periodic
flushes are amortised. It is reported in milliseconds and as a multiple of the *floor*: one bare
``torch._foreach_norm`` over all gradients, in the same hook of the same loop (``ForeachNormFloor``), the
least any gradient-norm monitor must spend. The end-to-end
step-time ratio against the baseline is printed beside it; on a busy machine it is the noisier number, and
it also holds what the recipe costs outside its hook (Lightning's per-metric bookkeeping of ``self.log``).

Usage::

    python benchmarks/overhead.py                 # CPU, both workloads, markdown table
    python benchmarks/overhead.py --repetitions 7 --steps 80
    python benchmarks/overhead.py --device cuda --workloads mlp gpt-small   # adds peak accelerator memory
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.harness import (
    WORKLOADS,
    ForeachNormFloor,
    StepTiming,
    interleaved_medians,
    machine_description,
    require_device,
    time_fit,
)
from lightning_gradstab import GradNormMonitor


def measure(workload, repetitions: int, steps: int, device: str) -> tuple[dict[str, StepTiming], float]:
    accelerator = "gpu" if device == "cuda" else "cpu"

    def run(make_monitor=None, recipe=False):
        def once() -> StepTiming:
            monitor = make_monitor() if make_monitor else None
            callbacks = [monitor] if monitor else []
            return time_fit(
                workload,
                callbacks,
                timed_callback=monitor,
                lightning_recipe=recipe,
                steps=steps,
                accelerator=accelerator,
            )

        return once

    def floor() -> StepTiming:
        callback = ForeachNormFloor()
        return time_fit(workload, [callback], timed_callback=callback, steps=steps, accelerator=accelerator)

    timings = interleaved_medians(
        {
            "baseline": run(),
            "floor": floor,
            "recipe": run(recipe=True),
            "monitor": run(GradNormMonitor),
            "monitor-per-param": run(
                lambda: GradNormMonitor(group_by="parameter", log_every_n_steps=1, log_grad_to_weight=False)
            ),
        },
        repetitions,
    )
    return timings, timings["floor"].hook_seconds


def markdown_table(rows: list[tuple[str, int, int, dict[str, StepTiming], float]]) -> str:
    lines = [
        "| workload | tensors | params | step (ms) | floor (ms) | recipe in-hook | monitor in-hook | "
        "monitor per-param in-hook | step-time ratio recipe / monitor / per-param |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, tensors, params, timings, floor in rows:
        base = timings["baseline"].step_seconds

        def hook(key: str, timings=timings, floor=floor) -> str:
            seconds = timings[key].hook_seconds
            return f"{1e3 * seconds:.3f} ms ({seconds / floor:.2f}x floor)"

        ratios = " / ".join(f"{timings[k].step_seconds / base:.3f}" for k in ("recipe", "monitor", "monitor-per-param"))
        lines.append(
            f"| {name} | {tensors} | {params / 1e6:.1f}M | {1e3 * base:.2f} | {1e3 * floor:.3f} | "
            f"{hook('recipe')} | {hook('monitor')} | {hook('monitor-per-param')} | {ratios} |"
        )
    return "\n".join(lines)


def memory_table(rows: list[tuple[str, int, int, dict[str, StepTiming], float]]) -> str:
    """Peak accelerator memory of each configuration (the most any repetition allocated)."""
    keys = ("baseline", "recipe", "monitor", "monitor-per-param")
    lines = [
        "| workload | peak accelerator memory (MiB) baseline | recipe | monitor | monitor per-param |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, _, _, timings, _ in rows:
        lines.append(f"| {name} | " + " | ".join(f"{timings[k].peak_memory_bytes / 2**20:.1f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--workloads", nargs="+", choices=sorted(WORKLOADS), default=["mlp", "gpt"], help="gpt-small: ~110M params"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps a shared box quiet)")
    args = parser.parse_args(argv)
    require_device(args.device)
    torch.set_num_threads(args.threads)
    rows = []
    for key in args.workloads:
        workload = WORKLOADS[key]()
        timings, floor = measure(workload, args.repetitions, args.steps, args.device)
        rows.append((workload.name, workload.parameter_tensors(), workload.parameter_count(), timings, floor))
    print(f"Machine: {machine_description()}")
    print(f"Median of {args.repetitions} interleaved repetitions of {args.steps} steps each.\n")
    print(markdown_table(rows))
    if args.device == "cuda":
        print()
        print(memory_table(rows))


if __name__ == "__main__":
    main()
