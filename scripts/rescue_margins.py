"""The rescue tests' statistic under a 1e-6 relative weight perturbation and 1 vs 2 threads.

For each case of ``tests/test_guard_rescue.py`` (same task, steps and seeds) and each variant, runs the guard and
the fixed clip and reports the median final loss of each, the test's bound ``1.05 x clip + 0.01`` and the margin
(bound - guard; positive: the test passes). Writes ``benchmarks/results/rescue-margins-cpu.md``.

    python scripts/rescue_margins.py --jobs 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_guard_rescue import CASES  # noqa: E402

VARIANTS = [(0.0, 1), (1e-6, 1), (0.0, 2), (1e-6, 2)]  # (relative weight perturbation, torch threads)


def _one(task: str, method: str, seed: int, steps: int, perturb: float, threads: int) -> dict:
    import torch

    from benchmarks import divergence_tasks
    from benchmarks.divergence import run_one

    torch.set_num_threads(threads)
    if perturb:
        original = divergence_tasks.TASKS[task].builder

        def perturbed(seed_: int, steps_: int) -> divergence_tasks.Built:
            built = original(seed_, steps_)
            generator = torch.Generator().manual_seed(1234 + seed_)
            with torch.no_grad():
                for parameter in built.module.parameters():
                    noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                    parameter.mul_(1 + perturb * noise)
            return built

        object.__setattr__(divergence_tasks.TASKS[task], "builder", perturbed)
    record = run_one(task, method, seed, steps)
    return {"task": task, "method": method, "seed": seed, "perturb": perturb, "threads": threads,
            "final_loss": record["final_loss"], "status": record["status"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/rescue-margins-cpu"))
    args = parser.parse_args()
    jobs = [(task, method, seed, steps, perturb, threads)
            for task, (steps, seeds) in CASES.items() for perturb, threads in VARIANTS
            for method in ("guard", "clip1") for seed in seeds]
    with ProcessPoolExecutor(args.jobs, max_tasks_per_child=1) as pool:  # a fresh process per run
        records = list(pool.map(_one, *zip(*jobs, strict=True)))
    out = Path(args.out)
    Path(args.out + ".json").write_text(json.dumps(records, indent=1))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    lines = [
        "# Rescue tests: margins under a weight perturbation and thread counts",
        "",
        f"- command: `python scripts/rescue_margins.py --jobs {args.jobs}"
        + ("" if args.out == parser.get_default("out") else f" --out {out.resolve().relative_to(REPO)}") + "`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu}; commit {commit.strip()}",
        "- statistic: the test's (median over its seeds of the final held-out loss); bound = 1.05 x clip + 0.01;"
        " margin = bound - guard (> 0: the test passes)",
        "",
        "| task (seeds) | perturbation | threads | guard | clip1 | bound | margin |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, (_, seeds) in CASES.items():
        for perturb, threads in VARIANTS:
            def median(method: str, task: str = task, perturb: float = perturb, threads: int = threads) -> float:
                return statistics.median(r["final_loss"] for r in records if (r["task"], r["method"], r["perturb"],
                                         r["threads"]) == (task, method, perturb, threads))
            guard, clip = median("guard"), median("clip1")
            bound = 1.05 * clip + 0.01
            lines.append(f"| {task} ({len(seeds)}) | {perturb:g} | {threads} | {guard:.3f} | {clip:.3f} | "
                         f"{bound:.3f} | {bound - guard:+.3f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
