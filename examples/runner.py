"""One Hydra job: build the suite's callbacks, the task and the trainer from the config, train, summarise.

Everything that can be wrong in a config is built before training starts (callbacks, network, optimizer,
trainer), so a bad value fails in the first seconds. A job that fails or diverges still leaves a
``summary.json`` saying so; in a multirun the error is reported and the sweep goes on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from examples.divergence import StopWhenDiverged
from examples.run_summary import RunSummary, write_summary
from lightning_gradstab.console import console_print
from lightning_gradstab.fit_summary import GUARD_INTERVENED, GUARD_STOPPED

DEFAULT_EXAMPLE = (
    "[bold]What this run shows:[/] the default example is a 30-layer ReLU MLP with Xavier init on the 8x8 digits, "
    "He et al. 2015's failing case. It stalls at chance (training loss ln 10 = 2.303) on purpose, so that the "
    "suite has something to find.\n"
    "[bold]Try next:[/] `python examples/train.py model.init=he` (He init: it trains) or "
    "`python examples/train.py gradstab.init_audit.fix=true` (the init audit repairs the Xavier weights before the "
    "first step); `python examples/train.py -m experiment=he2015` runs all three."
)


def build_gradstab_callbacks(gradstab: DictConfig) -> list[Callback]:
    """Instantiate every callback of the ``gradstab`` group, naming the entry that cannot be built.

    Example::

        callbacks = build_gradstab_callbacks(cfg.gradstab)  # [GradNormMonitor(...), ExplosionGuard(...), ...]
    """
    callbacks = []
    for entry, node in gradstab.items():
        try:
            callbacks.append(instantiate(node, _convert_="all"))  # plain dicts and lists, as a Python caller passes
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
    # "none" only where a diagnosis ran; gradstab=monitor has no InitAudit or ArchitectureAdvisor
    nothing = "none" if summary.get("diagnosis_ran", True) else "not run (no InitAudit or ArchitectureAdvisor)"
    table.add_row("findings", ", ".join(summary["findings"]) or nothing)
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    if summary["error"]:
        table.add_row("error", summary["error"])
    console_print(table, f"summary: {output_dir / 'summary.json'}\npanels:  tensorboard --logdir {output_dir}")


def is_default_example(cfg: DictConfig) -> bool:
    """Whether ``cfg`` is the default run's model and suite (the run that stalls on purpose)."""
    model, gradstab = cfg.model, cfg.gradstab
    return (
        cfg.name == "default"
        and cfg.task._target_.endswith("DigitsTask")
        and model.get("depth") == 30
        and (model.get("activation"), model.get("init"), model.get("norm"), model.get("residual"))
        == ("relu", "xavier", "none", False)
        and not gradstab.get("init_audit", {}).get("fix", False)
    )


def next_steps(cfg: DictConfig) -> dict[str, str]:
    """The end-of-fit summary's advice as overrides of this config (instead of the suite's Python advice).

    Example::

        next_steps(cfg)["init.scale"]  # "rerun with `model.init=he` ..."
    """
    model, steps = cfg.model, {}
    audit_fixes = bool(cfg.gradstab.get("init_audit", {}).get("fix", False))
    if "init" in model:
        steps["init.scale"] = (
            "the audit re-drew the flagged layers (`gradstab.init_audit.fix=true`); to start from a matching "
            "init instead: `model.init=he` for ReLU" if audit_fixes else
            "rerun with `model.init=he` (He init for ReLU), or let the audit repair the init: "
            "`gradstab.init_audit.fix=true`"
        )
        steps["init.symmetric"] = steps["init.scale"]
    if {"norm", "residual"} <= set(model):
        steps["signal.vanishing"] = (
            "after the init: normalization (`model.norm=batch`) or skip connections (`model.residual=true`)"
        )
        steps["arch.residual"] = "rerun with skip connections: `model.residual=true` (with `model.norm=batch`)"
        steps["arch.normalization"] = "rerun with normalization: `model.norm=batch` (or `model.norm=layer`)"
    if "activation" in model:
        steps["arch.activation"] = steps["activation.saturated"] = (
            "rerun with `model.activation=tanh`, or `model.activation=relu model.init=he`"
        )
    if "cell" in model:
        steps["arch.recurrent"] = "rerun with a gated cell: `model.cell=lstm` (or `model.cell=gru`)"
    lower_lr = f"`optim.optimizer.lr={float(cfg.optim.optimizer.lr) / 10:g}` or a warm-up `optim.warmup_steps=100`"
    steps["signal.exploding"] = f"a lower learning rate, {lower_lr}; keep the guard on (`gradstab=full`)"
    steps[GUARD_STOPPED] = f"the guard stopped the run: rerun with {lower_lr}"
    steps[GUARD_INTERVENED] = f"the guard skipped or rolled back steps: {lower_lr} avoids the spikes it caught"
    return steps


def log_once_through_hydra() -> None:
    """Lightning adds its own console handler when it is imported; under Hydra, whose root handler already
    prints (and writes ``<job>.log``), that shows every Lightning line twice. Keep Hydra's."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def run_experiment(cfg: DictConfig, output_dir: Path, metadata: dict[str, Any], reraise: bool) -> dict[str, Any]:
    """Train the configured task and return its summary (also written to ``output_dir/summary.json``).

    ``reraise``: re-raise a failure after recording it (single runs); in a multirun the sweep continues.

    Example::

        summary = run_experiment(cfg, Path("outputs/demo"), {"name": "demo"}, reraise=True)
    """
    log_once_through_hydra()
    recorder = RunSummary(output_dir, metadata, next_steps=next_steps(cfg))
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
        # in a sweep, name the run by the overrides that tell the jobs apart: TensorBoard lists "0/model.init=he"
        names = {"name": metadata["label"], "version": ""} if metadata.get("label") else {}
        trainer = instantiate(
            cfg.trainer,
            logger=instantiate(cfg.logger, **names),
            callbacks=[*gradstab_callbacks, StopWhenDiverged(cfg.stop_after_nonfinite_steps), recorder],
            default_root_dir=str(output_dir),
        )
        trainer.fit(task)
    except Exception as error:
        if rank_zero_only.rank == 0 and not recorder.path.exists():
            write_summary(recorder.path, recorder.summary(trainer, error))
        if reraise:
            raise
        console_print(f"[bold red]job failed:[/] {' '.join(metadata.get('overrides', []))}\n  {error!r}\n"
                      "the sweep continues; it exits with status 1 at the end", stream=sys.stderr)
    summary = _read_summary(recorder.path)
    if rank_zero_only.rank == 0 and summary is not None:
        print_summary(summary, output_dir)
        if is_default_example(cfg):
            console_print(DEFAULT_EXAMPLE)
    return summary or {}


def _read_summary(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def job_metadata(cfg: DictConfig, hydra_cfg: Any) -> dict[str, Any]:
    """Name, job number, command-line overrides and group choices of the current Hydra job.

    Example::

        metadata = job_metadata(cfg, HydraConfig.get())  # {"name": "he2015", "job_num": 1, ...}
    """
    overrides = list(hydra_cfg.overrides.task)
    return {
        "name": cfg.name,
        "job_num": hydra_cfg.job.get("num", 0),
        "overrides": overrides,
        "label": sweep_label(overrides, hydra_cfg) if hydra_cfg.mode == RunMode.MULTIRUN else "",
        "choices": {k: v for k, v in OmegaConf.to_container(hydra_cfg.runtime.choices).items()
                    if not k.startswith("hydra/")},
    }


def sweep_label(overrides: list[str], hydra_cfg: Any) -> str:
    """The overrides of this job whose key the sweep varies (command-line sweeps and a preset's
    ``hydra.sweeper.params``), as one directory name: ``model.init=he,seed=1``; ``/`` becomes ``-``.

    Example::

        sweep_label(["variant=he2015/he", "experiment=he2015"], HydraConfig.get())  # "variant=he2015-he"
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    swept = {o.key_or_group for o in parser.parse_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
             if o.is_sweep_override()}
    swept |= set((hydra_cfg.sweeper.get("params") or {}).keys())
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept]
    return ",".join(chosen).replace("/", "-")
