"""Shared fixtures: an in-memory logger and a helper that runs real 2-process CPU DDP jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from tests.helpers.subprocess_env import REPO, child_env


class MemoryLogger(Logger):
    """Keeps every logged scalar as ``metrics[name] -> [(step, value), ...]`` for assertions."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, list[tuple[int, float]]] = defaultdict(list)

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.metrics[key].append((step, float(value)))


@pytest.fixture(autouse=True)
def _run_in_a_temporary_directory(tmp_path, monkeypatch) -> None:
    """Trainers without a logger write reports and ``lightning_logs`` to the working directory: keep the
    repository clean by running every test in its own temporary one."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _restore_the_verbosity():
    """``set_verbosity`` is process-wide (a docstring example sets "quiet"): no test leaks it into the next."""
    from lightning_gradstab import console

    saved = console._verbosity
    yield
    console._verbosity = saved


@pytest.fixture
def memory_logger() -> MemoryLogger:
    return MemoryLogger()


def run_ddp_script(script: str | Path, out_dir: Path, *args: str, timeout: float = 240) -> list[dict]:
    """Run ``tests/scripts/<script>`` with Lightning's ``strategy="ddp"`` on 2 CPU processes.

    ``strategy="ddp"`` re-launches ``sys.argv`` per rank, which under pytest would re-run pytest, so the job
    runs as its own script. Each rank writes ``rank{N}.json`` into ``out_dir``; they are returned in rank
    order. A hang fails the test through ``timeout`` instead of blocking CI.
    """
    script_path = REPO / "tests" / "scripts" / script
    completed = subprocess.run(
        [sys.executable, str(script_path), str(out_dir), *args],
        env=child_env(PL_DISABLE_FORK="1"),
        cwd=str(out_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, f"DDP job failed:\n{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
    results = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
    return results


@pytest.fixture
def ddp_runner():
    return run_ddp_script


def reference_group_norms(module, group_of, parameters=None) -> tuple[dict[str, float], float]:
    """Float64 per-group and total L2 gradient norms, one parameter at a time (the slow, obvious way)."""

    unique = {}
    for name, parameter in module.named_parameters():
        wanted = parameters is None or any(parameter is p for p in parameters)
        if wanted and parameter.requires_grad and parameter.grad is not None and id(parameter) not in unique:
            unique[id(parameter)] = (name, parameter)
    sums: dict[str, float] = defaultdict(float)
    for name, parameter in unique.values():
        grad = parameter.grad.detach()
        grad = grad.coalesce().values() if grad.is_sparse else grad
        sums[group_of(name)] += float(grad.double().pow(2).sum())
    total = sum(sums.values()) ** 0.5
    return {group: value**0.5 for group, value in sums.items()}, total
