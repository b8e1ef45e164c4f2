"""Hydra callback: after a multirun, one table of every job's ``summary.json`` and a comparison figure.

Written into the sweep directory: ``summary.md`` (Markdown table), ``summary.csv``, ``summary.png``
(training-loss curves and final validation accuracy per job) and ``results.md`` (the table the docs quote:
the command, date, machine and versions, then the rows without wall time, which varies from run to run). The
same rows are printed on the console, each run named by the overrides that tell it apart, never truncated.
A job that failed or diverged is a row saying so; a job that left no summary at all is a row "missing". When a
job failed or is missing, its overrides and error are printed in red and the sweep exits with status 1.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.table import Table
from typing_extensions import override

from lightning_gradstab.console import console_print

COLUMNS = (
    "job",
    "run",
    "status",
    "train/loss",
    "train/acc",
    "val/loss",
    "val/acc",
    "best_val_acc",
    "guard_actions",
    "findings",
    "wall_time_s",
)


RESULT_COLUMNS = ("run", "status", "train/loss", "train/acc", "val/loss", "val/acc", "guard_actions", "findings")
"""The columns of ``results.md``: what a run ended with, reproducible to the digit on the same machine kind."""

FAILED = ("failed", "missing")
"""Statuses that make the sweep exit non-zero (``diverged`` and ``stopped by guard`` are outcomes, not errors)."""


def _format(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return " ".join(str(v) for v in value) or "none"
    return str(value)


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of ``sweep_dir`` (a directory holding ``.hydra/``), in job order.

    Example::

        rows = collect_rows(Path("multirun/he2015/2026-11-23_23-27-37"))
    """
    job_dirs = sorted(
        (path.parent for path in sweep_dir.rglob(".hydra") if path.parent != sweep_dir),
        key=lambda path: (len(path.parts), int(path.name) if path.name.isdigit() else path.name),
    )
    rows = []
    for job_dir in job_dirs:
        summary_path = job_dir / "summary.json"
        job = str(job_dir.relative_to(sweep_dir))
        if not summary_path.exists():
            rows.append({"job": job, "status": "missing"})
            continue
        summary = json.loads(summary_path.read_text())
        rows.append(
            {
                "job": job,
                "overrides": " ".join(summary.get("overrides", [])),
                "status": summary["status"],
                **summary["final"],
                "best_val_acc": summary.get("best_val_acc"),
                "guard_actions": summary.get("guard_actions", {}),
                "findings": summary.get("findings", []),
                "wall_time_s": summary.get("wall_time_s"),
                "error": summary.get("error"),
                "curves": summary.get("curves", {}),
                "initial_train_loss": summary.get("initial_train_loss"),
            }
        )
    return rows


def label_runs(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``run`` to the overrides that tell it apart (those shared by every job are dropped).

    Example::

        label_runs(rows)  # rows[0]["run"] == "model.depth=8 model.residual=False"
    """
    override_sets = [row.get("overrides", "").split() for row in rows if row["status"] != "missing"]
    shared = set.intersection(*map(set, override_sets)) if override_sets else set()
    for row in rows:
        distinct = [item for item in row.get("overrides", "").split() if item not in shared]
        row["run"] = " ".join(distinct) or row["job"]


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    """The rows as a GitHub Markdown table (the format the docs' experiment tables use).

    Example::

        (sweep_dir / "summary.md").write_text(markdown_table(rows))
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine_description() -> str:
    """CPU model, core count, OS and the torch / Lightning versions (read lazily: they load slowly)."""
    import lightning
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # Linux names the model; elsewhere keep platform's
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; "
            f"torch {torch.__version__}, lightning {lightning.__version__}, python {platform.python_version()}")


def code_version() -> str | None:
    """The checkout's commit, marked when files differ from it (None outside a git checkout)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"commit {commit}" + (" with uncommitted changes" if dirty else "")


def results_document(rows: list[dict[str, Any]], command: str) -> str:
    """``results.md``: how the table was made (command, date, machine), then the table.

    Example::

        (sweep_dir / "results.md").write_text(results_document(rows, "python examples/train.py -m experiment=he2015"))
    """
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [f"`{command}`", "", f"Date: {date}", "", f"Machine: {machine_description()}", ""]
    if (code := code_version()) is not None:
        header += [f"Code: {code}", ""]
    return "\n".join(header) + "\n" + markdown_table(rows, RESULT_COLUMNS)


def console_table(rows: list[dict[str, Any]], title: str) -> Table:
    """The rows for the console; the ``run`` column (what tells the jobs apart) wraps, never truncates."""
    table = Table(title=title)
    for column in ("job", *RESULT_COLUMNS, "wall_time_s"):
        longest = max((len(_format(row.get(column))) for row in rows), default=0)
        table.add_column(column, overflow="fold", min_width=min(longest, 40) if column == "run" else None)
    for row in rows:
        status = _format(row.get("status"))
        style = "bold red" if status in FAILED else ("yellow" if status != "finished" else "")
        cells = [_format(row.get(column)) for column in ("job", *RESULT_COLUMNS, "wall_time_s")]
        cells[2] = f"[{style}]{status}[/]" if style else status
        table.add_row(*cells)
    return table


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The rows as CSV, one column per entry of ``COLUMNS`` plus the error message.

    Example::

        write_csv(rows, sweep_dir / "summary.csv")
    """
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*COLUMNS, "error"])
        for row in rows:
            writer.writerow([_format(row.get(column)) for column in (*COLUMNS, "error")])


def comparison_figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Training loss per epoch for every job (log scale) beside each job's final validation accuracy.

    Example::

        comparison_figure(rows, sweep_dir / "summary.png")
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    labels = []
    for row in rows:
        label = row["run"]
        labels.append(label)
        curve = row.get("curves", {}).get("train/loss", [])
        epochs = row.get("curves", {}).get("epoch", [])
        points = [(e, v) for e, v in zip(epochs, curve, strict=False) if v is not None and v > 0]
        if points:
            loss_axes.plot(*zip(*points, strict=True), marker=".", label=label)
    loss_axes.set_yscale("log")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("training loss")
    if loss_axes.lines:
        loss_axes.legend(fontsize=7)
    accuracies = [row.get("val/acc") or 0.0 for row in rows]
    colors = ["tab:red" if row.get("status") != "finished" else "tab:blue" for row in rows]
    accuracy_axes.barh(range(len(rows)), accuracies, color=colors)
    for position, row in enumerate(rows):
        if row.get("status") != "finished":  # a lost run has no bar worth seeing: say what happened
            accuracy_axes.text(0, position, f" {row.get('status')}", va="center", color="tab:red", fontsize=8)
    accuracy_axes.set_yticks(range(len(rows)), labels, fontsize=7)
    accuracy_axes.invert_yaxis()
    accuracy_axes.set_xlabel("final validation accuracy (red: diverged, failed or missing)")
    figure.savefig(path, dpi=110)


def write_lr_sensitivity(rows: list[dict[str, Any]], sweep_dir: Path, command: str) -> str | None:
    """For a sweep over ``optim.optimizer.lr``: each arm's LR sensitivity (Wortsman et al. 2023) as
    ``lr_sensitivity.md`` (command, date, machine, code, table), ``lr_sensitivity.png`` (final loss against LR, one
    line per arm) and TensorBoard (``<sweep>/tensorboard_lr_sensitivity``). Returns the table (None: no LR swept).

    Example::

        write_lr_sensitivity(rows, Path("multirun/wortsman2023/2026-12-05_15-30-00"), "python examples/train.py ...")
    """
    from examples.lr_sensitivity import lr_sensitivity, sensitivity_figure, sensitivity_table, sensitivity_tensorboard

    arms = lr_sensitivity(rows)
    if not arms:
        return None
    table = sensitivity_table(arms)
    figure = sweep_dir / "lr_sensitivity.png"
    notes = []
    if not sensitivity_figure(arms, figure):
        notes.append("matplotlib is not installed: no lr_sensitivity.png")
        figure = None
    if not sensitivity_tensorboard(arms, table, figure, sweep_dir / "tensorboard_lr_sensitivity"):
        notes.append("tensorboard is not installed: no TensorBoard copy")
    document = results_document([], command).split("| run |")[0]  # the header: command, date, machine, code
    text = (document + "LR sensitivity (Wortsman et al. 2023): E_lr[min(final val loss, l0) - best], l0 = the first "
            "batch's loss; 'worst vs clip1': max over LRs of loss - (1.01 * clip1's + 0.01), <= 0 never worse.\n\n"
            + table + "".join(f"\n{note}\n" for note in notes))
    (sweep_dir / "lr_sensitivity.md").write_text(text)
    return table


class SweepSummary(Callback):
    """Gather every job's ``summary.json`` at the end of a multirun into a table and a figure.

    Registered in ``conf/config.yaml`` under ``hydra.callbacks``; it only acts on ``on_multirun_end``.

    Example::

        python examples/train.py -m model.init=xavier,he   # then read multirun/<name>/<time>/summary.md
    """

    @staticmethod
    def _lr_sensitivity(rows: list[dict[str, Any]], sweep_dir: Path, command: str) -> None:
        table = write_lr_sensitivity(rows, sweep_dir, command)
        if table is not None:
            console_print("LR sensitivity per arm (Wortsman et al. 2023)\n" + table + f"written: "
                          f"{sweep_dir / 'lr_sensitivity.md'}, lr_sensitivity.png, tensorboard_lr_sensitivity/")

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_rows(sweep_dir)
        label_runs(rows)
        (sweep_dir / "summary.md").write_text(markdown_table(rows))
        write_csv(rows, sweep_dir / "summary.csv")
        comparison_figure(rows, sweep_dir / "summary.png")
        command = " ".join(["python examples/train.py", *sys.argv[1:]])
        (sweep_dir / "results.md").write_text(results_document(rows, command))
        console_print(console_table(rows, f"sweep {sweep_dir}"))
        self._lr_sensitivity(rows, sweep_dir, command)
        failed = [row for row in rows if row["status"] in FAILED]
        for row in failed:
            console_print(f"[bold red]job {row['job']} {row['status']}:[/] {row.get('overrides') or row['run']}\n"
                          f"  {row.get('error') or 'no summary.json: the job died before writing one'}")
        console_print(f"written: {sweep_dir / 'summary.md'}, summary.csv, summary.png, results.md")
        if failed:
            # Hydra ends the process normally after the sweep: exit non-zero so scripts and CI see the failure
            raise SystemExit(f"{len(failed)} of {len(rows)} jobs failed (see above)")
