"""One Hydra job: build the suite's callbacks, the task and the trainer from the config, train, summarise.

Everything that can be wrong in a config is built before training starts (callbacks, network, optimizer,
trainer), so a bad value fails in the first seconds. A job that fails or diverges still leaves a
``summary.json`` saying so; in a multirun the error is reported and the sweep goes on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from examples.divergence import StopWhenDiverged
from examples.run_summary import RunSummary, write_summary


def build_gradstab_callbacks(gradstab: DictConfig) -> list[Callback]:
    """Instantiate every callback of the ``gradstab`` group, naming the entry that cannot be built.

    Example::

        callbacks = build_gradstab_callbacks(cfg.gradstab)  # [GradNormMonitor(...), ExplosionGuard(...), ...]
    """
    callbacks = []
    for entry, node in gradstab.items():
        try:
            callbacks.append(instantiate(node))
        except Exception as error:
            target = node.get("_target_", "?") if isinstance(node, DictConfig) else node
            raise ValueError(
                f"gradstab.{entry} ({target}) could not be built: {error}. Fix its options, or choose "
                "gradstab=monitor / gradstab=off if this installation lacks that callback."
            ) from error
    return callbacks


def print_summary(summary: dict[str, Any], output_dir: Path) -> None:
    """Show the run's outcome on the console: status, final metrics, guard actions, findings, where to look.

    Example::

        print_summary(json.loads(path.read_text()), path.parent)
    """
    table = Table(title=f"run {summary.get('name')} ({summary['status']})", show_header=False)
    for name, value in summary["final"].items():
        table.add_row(name, "—" if value is None else f"{value:.4g}")
    table.add_row("guard actions", ", ".join(f"{k}={v}" for k, v in summary["guard_actions"].items()) or "none")
    table.add_row("findings", ", ".join(summary["findings"]) or "none")
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    if summary["error"]:
        table.add_row("error", summary["error"])
    console = Console()
    console.print(table)
    console.print(f"summary: {output_dir / 'summary.json'}   panels: tensorboard --logdir {output_dir}")


def run_experiment(cfg: DictConfig, output_dir: Path, metadata: dict[str, Any], reraise: bool) -> dict[str, Any]:
    """Train the configured task and return its summary (also written to ``output_dir/summary.json``).

    ``reraise``: re-raise a failure after recording it (single runs); in a multirun the sweep continues.

    Example::

        summary = run_experiment(cfg, Path("outputs/demo"), {"name": "demo"}, reraise=True)
    """
    recorder = RunSummary(output_dir, metadata)
    trainer: pl.Trainer | None = None
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
        os.environ["OMP_NUM_THREADS"] = str(cfg.cpu_threads)  # inherited by ddp_spawn / ddp ranks
    try:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        gradstab_callbacks = build_gradstab_callbacks(cfg.gradstab)
        task = instantiate(
            cfg.task,
            build_network=instantiate(cfg.model),
            build_optimizer=instantiate(cfg.optim.optimizer),
            warmup_steps=cfg.optim.warmup_steps,
        )
        trainer = instantiate(
            cfg.trainer,
            logger=instantiate(cfg.logger),
            callbacks=[*gradstab_callbacks, StopWhenDiverged(cfg.stop_after_nonfinite_steps), recorder],
            default_root_dir=str(output_dir),
        )
        trainer.fit(task)
    except Exception as error:
        if rank_zero_only.rank == 0 and not recorder.path.exists():
            write_summary(recorder.path, recorder.summary(trainer, error))
        if reraise:
            raise
        Console(stderr=True).print(f"[red]job failed: {error!r}; the sweep continues[/red]")
    summary = _read_summary(recorder.path)
    if rank_zero_only.rank == 0 and summary is not None:
        print_summary(summary, output_dir)
    return summary or {}


def _read_summary(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def job_metadata(cfg: DictConfig, hydra_cfg: Any) -> dict[str, Any]:
    """Name, job number, command-line overrides and group choices of the current Hydra job.

    Example::

        metadata = job_metadata(cfg, HydraConfig.get())  # {"name": "he2015", "job_num": 1, ...}
    """
    return {
        "name": cfg.name,
        "job_num": hydra_cfg.job.get("num", 0),
        "overrides": list(hydra_cfg.overrides.task),
        "choices": {k: v for k, v in OmegaConf.to_container(hydra_cfg.runtime.choices).items()
                    if not k.startswith("hydra/")},
    }
