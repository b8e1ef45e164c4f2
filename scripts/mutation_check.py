"""Targeted mutation check: does the test suite fail when a core formula or contract is wrong?

Each mutation below replaces one exact source snippet with a plausible wrong version (a missing square root,
a flipped sign, an off-by-one threshold, a renamed contract key) in a scratch copy of the repository, then
runs the short pytest selection that specifies that code. A mutation is *killed* when the selection fails
(or times out) and *survived* when it passes; a snippet that no longer exists in the source is reported as
*stale* and not counted, and so is a mutation whose selection already fails on the unmutated copy (each
selection is run once unmutated first). The repository itself is never modified.

Run from the repository root (about 10 minutes on 2 CPU cores)::

    OMP_NUM_THREADS=1 python scripts/mutation_check.py

It prints one line per mutation and the kill rate, and writes ``benchmarks/results/mutation.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "mutation.md"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    snippet: str
    replacement: str
    tests: tuple[str, ...]


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "total gradient norm without the square root",
        "lightning_gradstab/stats.py",
        "sq_norms.sum().sqrt(), _nonfinite_count(sq_norms))",
        "sq_norms.sum(), _nonfinite_count(sq_norms))",
        ("tests/test_stats.py",),
    ),
    Mutation(
        "total gradient norm without the square root, sharded path (FSDP2, HSDP, TP)",
        "lightning_gradstab/stats.py",
        "total_norm = sq_norms.sum().sqrt()",
        "total_norm = sq_norms.sum()",
        ("tests/test_sharded_stats.py",),
    ),
    Mutation(
        "per-parameter weight norms without the square root",
        "lightning_gradstab/stats.py",
        'self._cache["weight"] = per_parameter_norms(self.layout, 2.0, weights=True)',
        'self._cache["weight"] = per_parameter_norms(self.layout, 2.0, weights=True).square()',
        ("tests/test_stats.py", "tests/test_monitor.py::test_ratios_and_inf_norm_are_logged_with_their_definitions"),
    ),
    Mutation(
        "per-parameter weight norms without the square root, sharded path",
        "lightning_gradstab/stats.py",
        'self._cache["weight"] = self.sum_like_weights(local).sqrt()',
        'self._cache["weight"] = self.sum_like_weights(local)',
        ("tests/test_sharded_stats.py", "tests/test_parallel_norms.py"),
    ),
    Mutation(
        "group sums added into the wrong groups (index reversed)",
        "lightning_gradstab/stats.py",
        "return names, sums.index_add_(0, index, values)",
        "return names, sums.index_add_(0, index.flip(0), values)",
        ("tests/test_stats.py",),
    ),
    Mutation(
        "gradient-to-weight ratio as ||g|| / ||w||^2",
        "lightning_gradstab/callbacks/monitor.py",
        "ratios = l2_norms / weight_norms.clamp_min(torch.finfo(torch.float32).tiny)",
        "ratios = l2_norms / weight_norms.square().clamp_min(torch.finfo(torch.float32).tiny)",
        ("tests/test_monitor.py", "tests/test_monitor_ratios.py"),
    ),
    Mutation(
        "update-to-weight ratio from the squared update norm",
        "lightning_gradstab/callbacks/monitor.py",
        "ratios = delta_norms.sqrt() / weight_norms",
        "ratios = delta_norms / weight_norms",
        ("tests/test_monitor.py",),
    ),
    Mutation(
        "TensorBoard layout writes nothing",
        "lightning_gradstab/tensorboard.py",
        "writer.add_custom_scalars(layout)",
        "layout.clear()",
        ("tests/test_monitor.py",),
    ),
    Mutation(
        "guard event key renamed (anomaly -> kind)",
        "lightning_gradstab/guard_events.py",
        "anomaly=self.anomaly,",
        "kind=self.anomaly,",
        ("tests/test_training_rules.py", "tests/test_advisor.py"),
    ),
    Mutation(
        "z-score sign flipped",
        "lightning_gradstab/running.py",
        "return (self._transform(value) - self.mean) / self.std",
        "return (self.mean - self._transform(value)) / self.std",
        ("tests/test_policy.py",),
    ),
    Mutation(
        "EMA mean moves by decay instead of 1 - decay",
        "lightning_gradstab/running.py",
        "self.mean += (1.0 - self.decay) * delta",
        "self.mean += self.decay * delta",
        ("tests/test_policy.py",),
    ),
    Mutation(
        "ZClip's reciprocal rule inverted (z / z_thr instead of z_thr / z)",
        "lightning_gradstab/guard/detect.py",
        "z_threshold * min(1.0, z_threshold / zscore)",
        "z_threshold * min(1.0, zscore / z_threshold)",
        ("tests/test_policy.py",),
    ),
    Mutation(
        "loss-spike rule fires on a loss far below its mean",
        "lightning_gradstab/guard/detect.py",
        "loss_zscore > config.loss_zscore_threshold or (",
        "-loss_zscore > config.loss_zscore_threshold or (",
        ("tests/test_policy.py",),
    ),
    Mutation(
        "fp16 overflow classification ignores rank-local faults",
        "lightning_gradstab/guard/ladder.py",
        "observation.nonfinite and not observation.rank_local",
        "observation.nonfinite",
        ("tests/test_policy.py",),
    ),
    Mutation(
        "non-finite count everywhere reduced by max instead of min",
        "lightning_gradstab/callbacks/_guard_step.py",
        '("nonfinite_count_everywhere", "min"),',
        '("nonfinite_count_everywhere", "max"),',
        (
            "tests/test_guard_ddp.py",
            "tests/test_faults.py::test_rank_local_faults_under_ddp_skip_the_same_steps_on_both_ranks_without_hanging",
        ),
    ),
    Mutation(
        "snapshot restore skips the optimizer state",
        "lightning_gradstab/guard/snapshot.py",
        'if self._skeleton["optimizers"] is not None:',
        'if self._skeleton["optimizers"] is None:',
        ("tests/test_snapshot.py",),
    ),
    Mutation(
        "He gain 2 -> 1 in the recommended init scale",
        "lightning_gradstab/diagnosis/init_rules.py",
        "gain = 2.0 / (1.0 + slope**2)",
        "gain = 1.0 / (1.0 + slope**2)",
        ("tests/test_diagnose.py",),
    ),
    Mutation(
        "recurrent spectral radius rule starts at 2 instead of 1",
        "lightning_gradstab/diagnosis/arch_rules.py",
        "        if radius > 1.0:",
        "        if radius > 2.0:",
        ("tests/test_diagnose.py", "tests/test_training_rules.py"),
    ),
    Mutation(
        "dead-unit warning threshold 0.5 -> 0.6",
        "lightning_gradstab/diagnosis/signal_rules.py",
        "DEAD_WARNING, DEAD_ERROR = 0.5, 0.9",
        "DEAD_WARNING, DEAD_ERROR = 0.6, 0.9",
        ("tests/test_diagnose.py",),
    ),
    Mutation(
        "plain depth needing residuals 20 -> 21",
        "lightning_gradstab/diagnosis/arch_rules.py",
        "PLAIN_DEPTH_RESIDUAL = 20",
        "PLAIN_DEPTH_RESIDUAL = 21",
        ("tests/test_training_rules.py",),
    ),
    Mutation(
        "loss stall threshold doubled",
        "lightning_gradstab/diagnosis/training_rules.py",
        "if improvement >= stall_improvement:",
        "if improvement >= 2 * stall_improvement:",
        ("tests/test_training_rules.py",),
    ),
    Mutation(
        "routine clipping at the resting rung called an explosion",
        "lightning_gradstab/diagnosis/training_rules.py",
        'if event.level > max(event.previous_level, RUNGS.index("clip")):',
        "if event.level > event.previous_level:",
        ("tests/test_training_rules.py",),
    ),
    Mutation(
        "the automatic norm ceiling applied to SGD too",
        "lightning_gradstab/guard/detect.py",
        "return SCALE_INVARIANT_MAX_NORM if observation.scale_invariant else math.inf",
        "return SCALE_INVARIANT_MAX_NORM",
        ("tests/test_guard_ceiling.py",),
    ),
    Mutation(
        "Adam-style optimizers with betas not recognised as scale-invariant",
        "lightning_gradstab/callbacks/_optimizers.py",
        'or "betas" in getattr(optimizer, "defaults", {})',
        'or "beta" in getattr(optimizer, "defaults", {})',
        ("tests/test_guard_ceiling.py",),
    ),
    Mutation(
        "the ceiling compared with the clip threshold the wrong way (max instead of min)",
        "lightning_gradstab/guard/detect.py",
        "threshold = min(threshold, judgement.update_threshold, ceiling)",
        "threshold = min(threshold, judgement.update_threshold, max(ceiling, judgement.norm))",
        ("tests/test_guard_ceiling.py",),
    ),
    Mutation(
        "vanishing/exploding band edges made exclusive",
        "lightning_gradstab/diagnosis/training_rules.py",
        "if 1 / RATIO_WARNING <= ratio <= RATIO_WARNING:",
        "if 1 / RATIO_WARNING < ratio < RATIO_WARNING:",
        ("tests/test_training_rules.py",),
    ),
    Mutation(
        "divergence margin without the share of the run's progress",
        "lightning_gradstab/guard/detect.py",
        "PROGRESS_SHARE * progress",
        "0.0 * progress",
        ("tests/test_policy.py",),
    ),
)


def _scratch_copy(destination: Path) -> None:
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "results")
    shutil.copytree(REPO, destination, ignore=ignore, symlinks=True)


def _run(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu",
               *tests]
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if completed.returncode == 0:
        return "survived", seconds
    if completed.returncode in (1, 3):  # failed tests, or an import error in collection: the mutation is seen
        return "killed", seconds
    return f"error (pytest exit {completed.returncode})", seconds


def _check_isolated(copy: Path) -> None:
    """The scratch copy, not the editable install in the repository, must be what the tests import."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    probe = "import lightning_gradstab, sys; sys.stdout.write(lightning_gradstab.__file__)"
    imported = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True)
    if not imported.stdout.startswith(str(copy)):
        raise SystemExit(f"the scratch copy is not imported (got {imported.stdout or imported.stderr!r})")


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per mutation's test run")
    parser.add_argument("--only", nargs="*", default=None, help="run the mutations whose name contains one of these")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results file")
    parser.add_argument("--output", type=Path, default=RESULTS, help="the results file (Markdown)")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or any(word in m.name for word in args.only)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gradstab-mutation-") as scratch:
        copy = Path(scratch) / "repo"
        _scratch_copy(copy)
        _check_isolated(copy)
        baseline = {}  # each selection must pass on the unmutated copy, or its kills would mean nothing
        for tests in dict.fromkeys(m.tests for m in mutations):
            baseline[tests], _ = _run(copy, tests, args.timeout)
            passed = "passes" if baseline[tests] == "survived" else f"FAILS ({baseline[tests]})"
            print(f"unmutated {passed:<12} {' '.join(tests)}", flush=True)
        for mutation in mutations:
            target = copy / mutation.path
            original = target.read_text()
            count = original.count(mutation.snippet)
            if count != 1:
                outcome, seconds = f"stale (snippet found {count} times)", 0.0
            elif baseline[mutation.tests] != "survived":
                outcome, seconds = "invalid (fails unmutated)", 0.0
            else:
                target.write_text(original.replace(mutation.snippet, mutation.replacement))
                try:
                    outcome, seconds = _run(copy, mutation.tests, args.timeout)
                finally:
                    target.write_text(original)
            rows.append((mutation, outcome, seconds))
            print(f"{outcome:<28} {seconds:6.1f} s  {mutation.name}  ({mutation.path})", flush=True)
    counted = [row for row in rows if row[1].startswith(("killed", "survived"))]
    killed = sum(row[1].startswith("killed") for row in counted)
    rate = f"{killed}/{len(counted)} killed ({100.0 * killed / max(len(counted), 1):.0f} %)"
    print(rate)
    if not args.no_write:
        _write(rows, rate, argv, args.output)
    return 0 if killed == len(counted) else 1


def _write(rows: list[tuple[Mutation, str, float]], rate: str, argv: list[str] | None, output: Path) -> None:
    import lightning
    import torch

    arguments = " ".join(argv if argv is not None else sys.argv[1:])
    command = f"OMP_NUM_THREADS=1 python scripts/mutation_check.py {arguments}"
    lines = [
        "# Targeted mutation check",
        "",
        f"- command: `{command.strip()}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {_machine()}; torch {torch.__version__}, lightning {lightning.__version__}",
        f"- result: {rate}",
        "",
        "| mutation | file | outcome | seconds | tests |",
        "|---|---|---|---|---|",
    ]
    for mutation, outcome, seconds in rows:
        tests = ", ".join(f"`{t}`" for t in mutation.tests)
        name = mutation.name.replace("|", "\\|")  # a norm's bars would split the table cell
        lines.append(f"| {name} | `{mutation.path}` | {outcome} | {seconds:.0f} | {tests} |")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
