"""Where a relative-update ceiling measurement spends its time on a CPU: the passes of
``RelativeUpdateCeiling.begin``/``end`` timed one by one on GPT-sized weights (12.2M floats in 25 matrices).

Usage: ``python benchmarks/ceiling_copy_cost.py --output benchmarks/results/ceiling-copy-cost-cpu.md``
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import write_results


def _ms(work: Callable[[], object], repeats: int = 10) -> float:
    work()
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shapes = [(1152, 384), (384, 384), (1536, 384), (384, 1536)] * 6 + [(4000, 384)]
    weights = [0.02 * torch.randn(shape) for shape in shapes]
    grads = [torch.randn_like(w) for w in weights]
    buffer = torch._foreach_mul(weights, 1.0)
    zeros = [torch.tensor(0.0)] * len(weights)
    rows = [
        ("the floor: one `_foreach_norm` over gradients of the same sizes", _ms(lambda: torch._foreach_norm(grads))),
        ("a fresh copy (`_foreach_mul(w, 1.0)`, what `begin` does)", _ms(lambda: torch._foreach_mul(weights, 1.0))),
        ("a copy into an existing buffer (`_foreach_copy_`)", _ms(lambda: torch._foreach_copy_(buffer, weights))),
        ("the step reversed (`_foreach_sub_`)", _ms(lambda: torch._foreach_sub_(buffer, weights))),
        ("scaled by a 0-dim factor per tensor (`_foreach_mul_`)", _ms(lambda: torch._foreach_mul_(buffer, zeros))),
        ("added back (`_foreach_add_`)", _ms(lambda: torch._foreach_add_(buffer, weights))),
    ]
    write_results(
        args.output,
        "A relative-update ceiling measurement, pass by pass (CPU)",
        [f"{sum(w.numel() for w in weights) / 1e6:.1f}M floats in {len(weights)} matrices; mean of 10 calls after one "
         "warm-up call"],
        ["| pass | ms |", "|---|---|", *[f"| {name} | {ms:.1f} |" for name, ms in rows]],
    )

if __name__ == "__main__":
    main()
