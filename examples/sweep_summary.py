"""Hydra callback: after a multirun, one table of every job's ``summary.json`` and a comparison figure.

Written into the sweep directory: ``summary.md`` (Markdown table), ``summary.csv`` and ``summary.png``
(training-loss curves and final validation accuracy per job); the table is also printed with rich. A job
that failed or diverged is a row saying so; a job that left no summary at all is a row "missing".
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from typing_extensions import override

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


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a GitHub Markdown table (the format the README's experiment tables use).

    Example::

        (sweep_dir / "summary.md").write_text(markdown_table(rows))
    """
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_format(row.get(column)) for column in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


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


class SweepSummary(Callback):
    """Gather every job's ``summary.json`` at the end of a multirun into a table and a figure.

    Registered in ``conf/config.yaml`` under ``hydra.callbacks``; it only acts on ``on_multirun_end``.

    Example::

        python examples/train.py -m model.init=xavier,he   # then read multirun/<name>/<time>/summary.md
    """

    @override
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_rows(sweep_dir)
        label_runs(rows)
        (sweep_dir / "summary.md").write_text(markdown_table(rows))
        write_csv(rows, sweep_dir / "summary.csv")
        comparison_figure(rows, sweep_dir / "summary.png")
        table = Table(title=f"sweep {sweep_dir}")
        for column in COLUMNS:
            table.add_column(column)
        for row in rows:
            table.add_row(*(_format(row.get(column)) for column in COLUMNS))
        console = Console(width=max(Console().width, 140))
        console.print(table)
        console.print(f"written: {sweep_dir / 'summary.md'}, summary.csv, summary.png")
