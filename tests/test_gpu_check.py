"""The prepared GPU check, dry-run on a machine without CUDA: it refuses fast and clearly, its commands parse."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environment, timeout=60)


@no_cuda
def test_without_cuda_the_script_stops_within_seconds_with_a_clear_message(tmp_path: Path) -> None:
    start = time.perf_counter()
    done = _run("--out", str(tmp_path / "results"))
    assert time.perf_counter() - start < 30  # one interpreter start, nothing else
    assert done.returncode == 2
    assert "no CUDA device: torch.cuda.is_available() is False" in done.stderr
    assert "nothing was run" in done.stderr
    assert not (tmp_path / "results").exists()


def test_a_python_without_torch_is_named() -> None:
    done = _run(PYTHON="/bin/false")
    assert done.returncode == 2 and "cannot import torch" in done.stderr


def test_help_and_unknown_arguments() -> None:
    shown = _run("--help")
    assert shown.returncode == 0
    assert "Usage: scripts/gpu_check.sh [--out DIR] [--quick] [--dry-run] [--help]" in shown.stdout
    assert "world size 1" in shown.stdout  # what a single GPU does and does not show about FSDP
    wrong = _run("--bogus")
    assert wrong.returncode == 64 and "unknown argument '--bogus'" in wrong.stderr


def test_dry_run_writes_every_result_under_one_folder_and_its_benchmark_commands_parse(tmp_path: Path) -> None:
    done = _run("--dry-run", OUT=str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(line.strip()) for line in done.stdout.splitlines() if line.startswith("   ")]
    logs = [line.split("-> ")[1] for line in done.stdout.splitlines() if line.startswith("== ")]
    assert len(commands) == len(logs) == 5
    assert all(Path(log).parent == tmp_path / "out" for log in logs)
    scripts = [c[1] if c[1] != "-m" else " ".join(c[1:4]) for c in commands]
    assert scripts == [
        "-m pytest -m",
        "benchmarks/overhead.py",
        "benchmarks/guard_overhead.py",
        "scripts/gpu_precision_check.py",
        "-m pytest tests/test_sharded_stats.py",
    ]
    for command in commands[1:3]:  # --device cuda --workloads mlp gpt-small ... parse, then need CUDA
        assert command[command.index("--device") + 1] == "cuda"
        assert command[command.index("--workloads") + 1 : command.index("--workloads") + 3] == ["mlp", "gpt-small"]


@no_cuda
@pytest.mark.parametrize("benchmark", ["overhead", "guard_overhead"])
def test_benchmarks_accept_device_cuda_and_refuse_it_clearly_without_cuda(benchmark: str) -> None:
    import importlib

    module = importlib.import_module(f"benchmarks.{benchmark}")
    argv = ["--device", "cuda", "--workloads", "mlp", "gpt-small", "--repetitions", "1", "--steps", "5"]
    with pytest.raises(SystemExit, match=r"--device cuda needs a CUDA device.*pass --device cpu"):
        module.main(argv)
    with pytest.raises(SystemExit) as wrong:
        module.main(["--device", "tpu"])
    assert wrong.value.code == 2  # argparse: invalid choice


def test_the_gpt_small_workload_is_large_enough_to_be_bandwidth_bound() -> None:
    from benchmarks.harness import gpt_small_workload

    with torch.device("meta"):  # counts parameters without allocating them
        assert gpt_small_workload().parameter_count() >= 100e6


class _Outcomes:
    """A pytest plugin recording each test's outcome and, for skips, the reason."""

    def __init__(self) -> None:
        self.outcomes: dict[str, tuple[str, str]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "setup" and report.skipped:
            self.outcomes[report.nodeid] = ("skipped", str(report.longrepr[2]))
        elif report.when == "call":
            self.outcomes[report.nodeid] = (report.outcome, "")


@no_cuda
def test_gpu_marked_tests_skip_on_cpu_with_a_reason() -> None:
    # in this process (the imports are done) and only the files that mark GPU tests: a fresh pytest over the
    # whole suite would spend a minute collecting on 2 cores
    candidates = [p for p in (REPO / "tests").glob("test_*.py") if p != Path(__file__).resolve()]
    files = sorted(str(p) for p in candidates if "@pytest.mark.gpu" in p.read_text())
    recorder = _Outcomes()
    code = pytest.main(["-m", "gpu", "-q", "-p", "no:cacheprovider", "--no-header", *files], plugins=[recorder])
    assert code == pytest.ExitCode.OK, recorder.outcomes
    assert len(recorder.outcomes) >= 4, recorder.outcomes  # config, diagnose, fp16 matrix, Lightning FSDP
    assert all(outcome == "skipped" and "CUDA" in reason for outcome, reason in recorder.outcomes.values()), (
        recorder.outcomes
    )


def test_the_mixed_precision_check_passes_its_own_checks_on_the_cpu(tmp_path: Path) -> None:
    """The fp16 (CPU GradScaler) and bf16 guard runs of the GPU check, on the CPU: spike acted on, NaN skipped."""
    import json

    from scripts.gpu_precision_check import main

    assert main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    results = {r["precision"]: r for r in json.loads((tmp_path / "precision.json").read_text())}
    assert set(results) == {"16-mixed", "bf16-mixed"}
    assert all(all(r["checks"].values()) for r in results.values()), {p: r["checks"] for p, r in results.items()}
    assert results["16-mixed"]["guard_summary"]["optimizers"]["0"]["counts"].get("amp_overflow", 0) >= 1
