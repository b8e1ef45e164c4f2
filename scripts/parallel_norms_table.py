"""Run the parallel-layouts launch that ``tests/test_parallel_norms.py`` runs and write its numbers as Markdown.

Usage: ``python scripts/parallel_norms_table.py --output docs/results/parallel_norms.md`` (about 30 s on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.divergence import machine  # noqa: E402

FITS = (
    "model_parallel_2x2",
    "model_parallel_4x1",
    "model_parallel_hsdp_2x2",
    "model_parallel_2x2_replicas_ignored",
    "model_parallel_hsdp_2x2_replicas_ignored",
)
BROKEN = (
    "forces every replica count to 1 (the behaviour before the fix); its self-check warned {n} time(s) with both"
    " numbers"
)


def _per_step(metrics: dict, key: str, digits: int = 4) -> list[float]:
    return [round(value, digits) for _, value in sorted(metrics[key])]


def _worst_difference(measured: dict, expected: dict) -> float:
    return max(
        abs(measured[key] - value) / abs(value) if value else abs(measured[key]) for key, value in expected.items()
    )


def render(out: Path) -> str:
    reference = json.loads((out / "reference.json").read_text())
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)]
    found = machine()
    command = "python scripts/parallel_norms_table.py --output docs/results/parallel_norms.md"
    lines = [
        "# Parallel layouts: suite norms against a one-process float64 reference",
        "",
        f"Command: `{command}` (it runs `tests/scripts/parallel_norms.py`, as `tests/test_parallel_norms.py` does).",
        f"Machine: {found['cpu']}, {found['cores']} cores, torch {found['torch']}, Lightning {found['lightning']}, "
        f"Python {found['python']}, 4 gloo processes. Code: git commit {found['commit']}. "
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        "## Raw layouts: largest relative difference over every reduction (L2/L1/max/weight/update norms per module,"
        " totals, non-finite count), over the 4 ranks",
        "",
        f"| layout | total norm (reference {reference['raw']['total']!r}) | gathered total"
        " | worst relative difference |",
        "|---|---|---|---|",
    ]
    for layout in ("fsdp2", "hsdp", "tp", "tp_sequence_parallel", "fsdp1", "fsdp1_hybrid"):
        worst = max(_worst_difference(results[layout], reference["raw"]) for results in ranks)
        lines.append(f"| {layout} | {ranks[0][layout]['total']!r} | {ranks[0][layout]['gathered']!r} | {worst:.1e} |")
    lines += [
        "",
        "## Lightning fits (6 Adam steps, GradNormMonitor + ExplosionGuard defaults; rank 0's logged values)",
        "",
        "`model_parallel_hsdp_2x2` is `ModelParallelStrategy(4, 1)` whose `configure_model` calls `fully_shard` on its"
        " own 2 x 2 replicate x shard mesh.",
        "",
        "| run | grad_norm/total per step | clipped per step | self-check (suite, gathered) |",
        "|---|---|---|---|",
    ]
    rows = [("one process", reference["fit"])] + [(fit, ranks[0][fit]) for fit in FITS]
    for name, fitted in rows:
        norms = _per_step(fitted["metrics"], "gradstab/grad_norm/total")
        clipped = _per_step(fitted["metrics"], "gradstab/clipped")
        lines.append(f"| {name} | {norms} | {clipped} | {fitted['self_check']} |")
    lines.append("")
    for fit in FITS:
        if fit.endswith("_replicas_ignored"):
            lines.append(f"`{fit}` " + BROKEN.format(n=len(ranks[0][fit]["warnings"])) + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, PL_DISABLE_FORK="1", OMP_NUM_THREADS="1", TEST_PORT="29561")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
        subprocess.run(
            [sys.executable, str(ROOT / "tests/scripts/parallel_norms.py"), scratch], env=env, cwd=scratch, check=True
        )
        args.output.write_text(render(Path(scratch)))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
