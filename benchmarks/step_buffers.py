"""What does keeping the forward's buffers for a possible skip cost (``ExplosionGuard``, issue 19)?

A skipped step must leave no trace in BatchNorm's running statistics, so before each optimizer step's first
forward the guard copies the buffers a forward changes (``lightning_gradstab.guard.step_buffers.StepBuffers``). This
times, in one process and interleaved, a plain training step of a BatchNorm CNN (forward, backward, SGD step)
and the copy (``StepBuffers.save``) before it, and reports the copy's bytes and its share of the step. After
the first step only the buffers the forward wrote to are copied (running mean, variance and counter of each
BatchNorm layer; none for a model without running statistics).

Usage::

    python benchmarks/step_buffers.py                      # CPU, markdown table
    python benchmarks/step_buffers.py --steps 200 --repetitions 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from lightning_gradstab.guard.step_buffers import StepBuffers


def bn_cnn(depth: int, channels: int) -> nn.Module:
    """``depth`` conv-BN-ReLU blocks at ``channels`` channels on 32x32 inputs, then a linear head."""
    layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def measure(depth: int, channels: int, batch: int, steps: int, repetitions: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = bn_cnn(depth, channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    buffers = StepBuffers()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(3):  # warm-up, and the first two saves (every buffer, then the narrowing)
        buffers.save(model)
        train_step()
    step_ms, save_ms = [], []
    for _ in range(repetitions):
        step_times, save_times = [], []
        for _ in range(steps):
            start = time.perf_counter()
            buffers.save(model)
            middle = time.perf_counter()
            train_step()
            end = time.perf_counter()
            save_times.append(middle - start)
            step_times.append(end - middle)
        step_ms.append(1e3 * statistics.median(step_times))
        save_ms.append(1e3 * statistics.median(save_times))
    all_buffers = sum(b.nbytes for b in model.buffers())
    return {
        "step_ms": statistics.median(step_ms),
        "save_ms": statistics.median(save_ms),
        "copied_bytes": buffers.nbytes,
        "buffer_bytes": all_buffers,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; "
        f"{args.repetitions} repetitions x {args.steps} steps, medians\n"
    )
    print("| model | parameters | buffers copied / all (KiB) | train step (ms) | buffer copy (ms) | copy / step |")
    print("|---|---|---|---|---|---|")
    for depth, channels, batch in [(8, 32, 32), (20, 64, 16)]:
        row = measure(depth, channels, batch, args.steps, args.repetitions)
        print(
            f"| {depth} conv-BN blocks x {channels} ch, batch {batch} | {row['parameters'] / 1e6:.2f}M | "
            f"{row['copied_bytes'] / 1024:.1f} / {row['buffer_bytes'] / 1024:.1f} | {row['step_ms']:.2f} | "
            f"{row['save_ms']:.4f} | {row['save_ms'] / row['step_ms']:.2%} |"
        )


if __name__ == "__main__":
    main()
