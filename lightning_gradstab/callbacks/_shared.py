"""Lightning glue shared by the callbacks: one statistics pass per optimizer step, rank-0 logging, the end-of-fit
summary.

The suite callbacks of one trainer share one :class:`TrainerSuite`: the first to ask creates it and every suite
callback of that trainer holds it (:func:`suite_of`). It carries the per-step statistics cache (the first caller
of a step computes the statistics, the others get the same object), the first-batch measurement, the loggers that
failed and the console's state. It lives with the callbacks, not in a module-level table keyed by trainer: two
trainers in one process never share numbers, and a finished trainer leaves nothing behind.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_gradstab.distributed import (
    SELF_CHECK_RTOL,
    fsdp1_replica_counts,
    gathered_total_norm,
    refuse_unsupported_strategy,
    strategy_kind,
)
from lightning_gradstab.stats import GradientStats, ParameterLayout, compute_gradient_stats

if TYPE_CHECKING:
    from lightning_gradstab.guard.summary import GuardSummary
    from lightning_gradstab.report import Report


@dataclass(frozen=True)
class SummaryContribution:
    """What one suite callback adds to the end-of-fit summary: its reports, its guard summaries (one per
    ExplosionGuard that prints) and the modules it re-initialized."""

    reports: tuple[Report, ...] = ()
    guard_summaries: tuple[GuardSummary, ...] = ()
    fixed_modules: tuple[str, ...] = ()


class SuiteCallback(Callback):
    """A callback of the suite. The end-of-fit summary and the TensorBoard layout ask each one what it adds, so
    the shared code needs neither the concrete classes nor their modules (no import cycle). The defaults add
    nothing."""

    gradstab_suite: TrainerSuite | None = None
    """The state this callback shares with the other suite callbacks of its trainer (set by :func:`suite_of`)."""

    def summary_contribution(self) -> SummaryContribution:
        """What this callback adds to the end-of-fit summary."""
        return SummaryContribution()

    def tensorboard_charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """Titles of the ``tensorboard`` layout's charts this callback fills on this run."""
        return []


@dataclass
class TrainerSuite:
    """What the suite callbacks of one trainer share (see the module docstring)."""

    trainer: weakref.ReferenceType[pl.Trainer]
    layouts: dict[int, ParameterLayout] = field(default_factory=dict)
    step_key: tuple | None = None
    step_stats: dict[int, GradientStats] = field(default_factory=dict)
    failed_loggers: set[int] = field(default_factory=set)
    self_check: bool = False  # compare the first step's total norm with a gathered one (see request_self_check)
    self_checked: set[int] = field(default_factory=set)
    sharding: tuple[str, dict[int, int] | None] | None = None  # (strategy kind, FSDP1 replica counts by id)
    first_batch: tuple[tuple, Any] | None = None  # (what was probed, the probe's result): see _first_batch
    next_steps: dict[str, str] = field(default_factory=dict)
    summary_printed_at_step: int | None = None
    fit_started_at: float | None = None  # wall clock: report files older than this were left by an earlier run

    def forget_fit(self) -> None:
        """Drop what belongs to one fit (layouts, statistics, failed loggers, the self-check, the first batch);
        the console's state stays (its summary is printed once per fit step, its advice set once)."""
        self.layouts, self.step_key, self.step_stats, self.failed_loggers = {}, None, {}, set()
        self.self_check, self.self_checked, self.sharding, self.first_batch = False, set(), None, None


def suite_of(trainer: pl.Trainer) -> TrainerSuite:
    """The suite state of ``trainer``: the one its suite callbacks hold, else a new one they all take.

    A trainer without suite callbacks (a bare stand-in) gets a fresh state on each call: nothing to share.
    """
    members = [c for c in getattr(trainer, "callbacks", ()) if isinstance(c, SuiteCallback)]
    for member in members:
        held = member.gradstab_suite
        if held is not None and held.trainer() is trainer:
            suite = held
            break
    else:
        suite = TrainerSuite(weakref.ref(trainer))
    for member in members:  # a callback moved to another trainer joins that trainer's suite
        member.gradstab_suite = suite
    return suite


def is_sharded(trainer: pl.Trainer) -> bool:
    """Whether gradients are shards or copies spread over ranks, whose norms are combined across ranks (FSDP,
    ``ModelParallelStrategy``: FSDP2, HSDP, tensor parallelism). Decided by type, so subclasses count."""
    return strategy_kind(trainer.strategy) in ("fsdp", "model_parallel")


def request_self_check(trainer: pl.Trainer) -> None:
    """Check the first optimizer step's total norm against an independent, gathered one (see
    :func:`gradient_stats`). Call it on every rank (a callback's ``setup`` does): the check is a collective."""
    suite_of(trainer).self_check = True


def optimizer_step_key(trainer: pl.Trainer) -> tuple[int, int]:
    """Identifies the current optimizer step: the same for every hook call within one step."""
    return trainer.global_step, trainer.fit_loop.total_batch_idx


def optimizer_index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    """Position of ``optimizer`` in ``trainer.optimizers`` (unwrapping ``LightningOptimizer``)."""
    raw = getattr(optimizer, "_optimizer", optimizer)
    for index, candidate in enumerate(trainer.optimizers):
        if candidate is raw or getattr(candidate, "_optimizer", None) is raw:
            return index
    return 0


def parameter_layout(
    trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
) -> ParameterLayout:
    """The cached parameter layout of ``optimizer`` (built on first use)."""
    raw = getattr(optimizer, "_optimizer", optimizer)
    layouts = suite_of(trainer).layouts
    if id(raw) not in layouts:
        refuse_unsupported_strategy(trainer.strategy, "lightning_gradstab")  # never a silent zero norm
        layouts[id(raw)] = ParameterLayout.from_module(pl_module, raw)
    return layouts[id(raw)]


def gradient_stats(
    trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
) -> GradientStats:
    """Gradient statistics of the current optimizer step, computed once and shared by every callback.

    Call it from ``on_before_optimizer_step``. Under a sharded strategy it enters one collective, so every
    rank must call it on the same steps (all callbacks of the suite do). With :func:`request_self_check`, the
    first step of each optimizer also computes the total norm independently (full gradients gathered) and
    warns with both numbers if they differ by more than ``SELF_CHECK_RTOL``; both land in ``stats.self_check``.
    """
    state = suite_of(trainer)
    key = optimizer_step_key(trainer)
    if state.step_key != key:
        state.step_key, state.step_stats = key, {}
    raw = getattr(optimizer, "_optimizer", optimizer)
    if id(raw) not in state.step_stats:
        layout = parameter_layout(trainer, pl_module, raw)
        if state.sharding is None:  # once per fit: the strategy and its FSDP1 flat-shard counts do not change
            kind = strategy_kind(trainer.strategy)
            # cast: under FSDP the strategy has wrapped the model by the time gradients exist
            plain = (
                fsdp1_replica_counts(cast(torch.nn.Module, trainer.strategy.model), trainer.world_size)
                if kind == "fsdp" else None
            )
            state.sharding = (kind, plain)
        kind, plain = state.sharding
        sharded = kind in ("fsdp", "model_parallel") or (layout.holds_dtensors and trainer.world_size > 1)
        stats = compute_gradient_stats(layout, sharded=sharded, plain_replicas=plain)
        if state.self_check and id(raw) not in state.self_checked:
            state.self_checked.add(id(raw))
            stats.self_check = _self_check(trainer, stats, kind)
        state.step_stats[id(raw)] = stats
    return state.step_stats[id(raw)]


def _self_check(trainer: pl.Trainer, stats: GradientStats, kind: str) -> tuple[float, float]:
    """``(suite total norm, gathered total norm)``; warns on rank 0 when they differ."""
    root = None
    if kind == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        # cast: under FSDP the strategy has wrapped the model by the time gradients exist
        roots = FullyShardedDataParallel.fsdp_modules(cast(torch.nn.Module, trainer.strategy.model), root_only=True)
        root = roots[0] if roots else None
    gathered = gathered_total_norm(stats.layout.parameters, root)
    suite = float(stats.total_norm)
    agree = (suite == gathered) or abs(suite - gathered) <= SELF_CHECK_RTOL * max(abs(gathered), 1e-30)
    if not agree:
        rank_zero_warn(
            f"lightning_gradstab self-check: the suite's total gradient norm is {suite:.9g} but the gathered full "
            f"gradients give {gathered:.9g} (relative difference above {SELF_CHECK_RTOL:g}) under "
            f"{type(trainer.strategy).__name__}; the logged norms and the guard's decisions are not to be trusted "
            "for this layout. Please report it with the strategy and how the model is parallelized."
        )
    return suite, gathered


def forget_trainer(trainer: pl.Trainer) -> None:
    """Drop cached layouts, statistics and the first batch (called at teardown, so the next fit starts clean)."""
    suite_of(trainer).forget_fit()


def logging_step(trainer: pl.Trainer) -> int:
    """The step axis Lightning's own loggers use (the same one ``LearningRateMonitor`` writes to)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` to every logger of the trainer, on global rank 0 only.

    A logger that raises is reported once and skipped afterwards: monitoring must never stop training.
    """
    if trainer.global_rank != 0 or not metrics:
        return
    state = suite_of(trainer)
    for logger in trainer.loggers:
        if id(logger) in state.failed_loggers:
            continue
        try:
            logger.log_metrics(metrics, step=step)
        except Exception as error:  # a broken logger must not take the run down
            state.failed_loggers.add(id(logger))
            rank_zero_warn(
                f"lightning_gradstab: logger {type(logger).__name__} raised {error!r}; "
                "gradient statistics are no longer written to it (training continues)."
            )


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of each TensorBoard logger (rank 0 only; empty elsewhere)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if trainer.global_rank != 0:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


STATE_VERSION = 1
"""Layout version of the callbacks' ``state_dict``; bumped when a field changes meaning."""


def check_state_version(callback_name: str, state: dict[str, Any]) -> None:
    """Refuse a ``state_dict`` of another layout with a message naming the callback and both versions."""
    version = state.get("version")
    if version != STATE_VERSION:
        raise ValueError(
            f"{callback_name} state has version {version!r}; this code reads version {STATE_VERSION}. "
            "Resume without the callback's state (drop it from the checkpoint's 'callbacks') to start it fresh."
        )


_REPORT_FILES = (
    "gradstab_init_audit.json",
    "gradstab_advisor.json",
    "gradstab_guard_summary.json",
    "gradstab_guard_events.jsonl",
)


def set_next_steps(trainer: pl.Trainer, next_steps: dict[str, str]) -> None:
    """Phrase the end-of-fit summary's advice for how this run is configured (finding code -> sentence).

    The suite's default advice is Python (``InitAudit(fix=True)``, "use He init"); a launcher that configures
    the model differently, e.g. a Hydra script, registers its own terms here (``"rerun with model.init=he"``).
    Call it on every process that trains (a callback's ``setup`` does), before the fit ends.

    Example::

        set_next_steps(trainer, {"init.scale": "rerun with `model.init=he`"})
    """
    suite_of(trainer).next_steps = dict(next_steps)


def mark_fit_start(trainer: pl.Trainer) -> None:
    """Note when this fit started (first call wins), so the summary lists only report files this fit wrote."""
    state = suite_of(trainer)
    if state.fit_started_at is None:
        state.fit_started_at = time.time()


def print_fit_summary(trainer: pl.Trainer) -> None:
    """Print :func:`~lightning_gradstab.fit_summary.fit_summary` once per fit, on global rank 0.

    Every suite callback calls it from ``teardown``; the first call prints (after every callback's
    ``on_fit_end``, so after the guard's table), the others find it printed.
    """
    if trainer.global_rank != 0:
        return
    from lightning_gradstab.console import console_print
    from lightning_gradstab.fit_summary import fit_summary

    state = suite_of(trainer)
    if state.summary_printed_at_step == trainer.global_step:
        return
    state.summary_printed_at_step = trainer.global_step
    # Trainer.callbacks is set by Lightning's callback connector at init; the class does not declare it
    callbacks: list[pl.Callback] = trainer.callbacks  # type: ignore[attr-defined]
    parts = [c.summary_contribution() for c in callbacks if isinstance(c, SuiteCallback)]
    reports = [report for part in parts for report in part.reports]
    guards = [summary for part in parts for summary in part.guard_summaries]
    if not reports and not guards:
        return
    fixed = [name for part in parts for name in part.fixed_modules]
    logger = trainer.loggers[0] if trainer.loggers else None  # not trainer.log_dir: a collective, rank 0 only here
    directory = getattr(logger, "log_dir", None) or trainer.default_root_dir
    files = [
        str(path) for name in _REPORT_FILES if _written_since(path := Path(directory) / name, state.fit_started_at)
    ]
    try:
        summary = fit_summary(reports, guards, state.next_steps, files, fixed_modules=fixed)
        console_print(*summary, trainer=trainer)
    except Exception as error:  # a broken console must not take the run down
        rank_zero_warn(f"lightning_gradstab: printing the fit summary failed: {error!r}")


def _written_since(path: Path, started_at: float | None) -> bool:
    """Whether ``path`` exists and was written by this fit (not left in the directory by an earlier run)."""
    try:
        modified = path.stat().st_mtime
    except OSError:
        return False
    return started_at is None or modified >= started_at - 0.05  # file times come from a coarser kernel clock


def add_tensorboard_layout(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Register the "Gradient stability" layout on every TensorBoard writer, with only the charts that the
    trainer's suite callbacks will fill (their settings decide), so no panel stays empty. Once per writer."""
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    from lightning_gradstab import tensorboard

    charts: list[str] = []
    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning at init, not declared
        if isinstance(callback, SuiteCallback):
            charts += callback.tensorboard_charts(trainer, pl_module)
    for writer in writers:
        tensorboard.add_layout(writer, charts, optimizers=max(1, len(trainer.optimizers)))
