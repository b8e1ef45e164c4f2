"""How far healthy SGD runs take their weights' norm above its value at the lowest loss (guard v3.10's evidence).

Under plain SGD the guard drops the noise part of its divergence margin once the weights' norm is
``WEIGHT_GROWTH_EVIDENCE`` (2) times its value at the lowest smoothed loss. This script trains the healthy SGD tasks of
the divergence benchmark and of the healthy corpus under ``ExplosionGuard()`` and reports, per run, the largest ratio
of the guard's weight norm to its value at the lowest loss that the guard saw. Run from the repository root:

    python benchmarks/weight_growth_healthy.py --seeds 3 --out benchmarks/results/weight-growth-healthy-cpu.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("healthy_sgd_mlp", "healthy_sgd_cnn", "sgdr_mlp", "curriculum_classes", "label_noise30", "hard_batches")


def largest_ratio(task: str, seed: int) -> float:
    """The largest weight norm / weight norm at the lowest loss the default guard saw in one run of ``task``."""
    import lightning.pytorch as pl

    from benchmarks.divergence import run_one

    ratios = [1.0]

    def watch(callbacks: list) -> list:
        guard = callbacks[0]

        class Watch(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                for policy in guard.policies.values():
                    detector = policy.detector
                    if detector.loss_trend.weight_norm_at_lowest > 0:
                        ratios.append(detector.weight_norm / detector.loss_trend.weight_norm_at_lowest)

        return [Watch()]

    run_one(task, "guard", seed, watch=watch)
    return max(ratios)


def main() -> None:
    from benchmarks.divergence import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/weight-growth-healthy-cpu.md")
    args = parser.parse_args()
    found = machine()
    rows = []
    for task in TASKS:
        ratios = [largest_ratio(task, seed) for seed in range(args.seeds)]
        rows.append(f"| {task} | " + " | ".join(f"{r:.3f}" for r in ratios) + f" | {max(ratios):.3f} |")
        print(rows[-1], flush=True)
    command = shlex.join(["python", "benchmarks/weight_growth_healthy.py", *sys.argv[1:]])
    text = "\n".join([
        "# Healthy SGD runs: the weights' norm against its value at the lowest loss",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {found['cpu']}, {found['cores']} cores; "
        f"torch {found['torch']}; code: git commit {found['commit']}",
        "- cell: the largest ratio, over the run's steps, of the weight norm the guard measured (every 10 steps) to "
        "its value at the lowest smoothed loss; guard v3.10 treats 2 as evidence of a step too large",
        "",
        "| task | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | largest |",
        "|---|" + "---|" * (args.seeds + 1),
        *rows,
        "",
    ])
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
