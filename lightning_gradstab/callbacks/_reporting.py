"""What the reporting callbacks (``InitAudit``, ``ArchitectureAdvisor``) share: the base class, running
``training_step`` outside the loop, and publishing a report on global rank 0."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_gradstab.callbacks._shared import (
    SuiteCallback,
    SummaryContribution,
    logging_step,
    mark_fit_start,
    print_fit_summary,
    tensorboard_writers,
)
from lightning_gradstab.compiled import uncompiled_method
from lightning_gradstab.report import Report

ForwardFn = Callable[[pl.LightningModule, Any], Any]
"""``forward_fn(pl_module, batch) -> output``: how to run the model on a batch outside ``training_step``."""


class ReportingCallback(SuiteCallback):
    """What InitAudit and ArchitectureAdvisor share: an optional ``forward_fn`` to probe with, the latest
    ``report``, and the log directory the report is written to (resolved at fit start, on every rank)."""

    def __init__(self, forward_fn: ForwardFn | None = None) -> None:
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"`forward_fn` must be callable or None, got {type(forward_fn).__name__}")
        self.forward_fn = forward_fn
        self.report: Report | None = None
        self._log_dir: Path | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mark_fit_start(trainer)  # the summary lists only the report files written from here on
        self._log_dir = report_directory(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            print_fit_summary(trainer)

    @override
    def summary_contribution(self) -> SummaryContribution:
        return SummaryContribution(reports=(self.report,) if self.report is not None else ())


def report_directory(trainer: pl.Trainer) -> Path:
    """Where reports go: the logger's directory, else ``default_root_dir`` (a collective: call on every rank)."""
    return Path(trainer.log_dir or trainer.default_root_dir)


@contextmanager
def probing(pl_module: pl.LightningModule) -> Iterator[None]:
    """Run ``training_step`` outside the loop: ``self.log`` muted, ``forward`` eager under ``torch.compile``.

    The compiled ``forward`` would recompile for the probe's hooks and function mode (and may skip them);
    the eager one is swapped in for the probe only, so the training step's compiled graph stays untouched.
    """

    def ignore(*args: Any, **kwargs: Any) -> None:
        return None

    swapped = {"log": ignore, "log_dict": ignore}
    original_forward = uncompiled_method(pl_module, "forward")
    if original_forward is not None:
        swapped["forward"] = original_forward
    saved = {name: pl_module.__dict__[name] for name in swapped if name in pl_module.__dict__}
    for name, value in swapped.items():
        object.__setattr__(pl_module, name, value)
    try:
        yield
    finally:
        for name in swapped:
            if name in saved:
                object.__setattr__(pl_module, name, saved[name])
            else:
                object.__delattr__(pl_module, name)


def publish_report(trainer: pl.Trainer, report: Report, directory: Path | None, filename: str) -> None:
    """On global rank 0: print the table, add the Markdown to TensorBoard and write the JSON file."""
    if trainer.global_rank != 0:
        return
    try:
        report.print(trainer=trainer)  # through the progress bar, which would draw over it
        step = logging_step(trainer)
        for writer in tensorboard_writers(trainer):
            writer.add_text("gradstab/findings", report.to_markdown(), step)
            writer.flush()
        if directory is not None:
            report.write_json(directory / filename)
    except Exception as error:  # a broken console or disk must not take the run down
        rank_zero_warn(f"lightning_gradstab: writing the {report.source} report failed: {error!r}")
