"""ExplosionGuard: catch a gradient explosion before the update lands, escalate, recover, and say what happened.

A thin Lightning adapter over :class:`~lightning_gradstab.policy.ExplosionPolicy`. Per optimizer step it reads
the shared gradient statistics, reduces the few numbers a decision needs across ranks in one collective, reads
them on the host once, and carries out the policy's decision (clip, skip, scale the learning rate, roll back,
stop) identically on every rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_gradstab.callbacks._shared import (
    STATE_VERSION,
    add_tensorboard_layout,
    check_state_version,
    gradient_stats,
    log_metrics,
    logging_step,
    optimizer_index,
    print_fit_summary,
    validate_flag,
    validate_interval,
)
from lightning_gradstab.policy import RUNGS, Decision, ExplosionPolicy, Observation, PolicyConfig
from lightning_gradstab.report import console_print
from lightning_gradstab.running import FLOAT32_MAX, RankReduction
from lightning_gradstab.snapshot import (  # noqa: F401  (re-exported: the rollback snapshot lives there)
    TrainingSnapshot,
    _to_cpu,
    restore_training_state,
    snapshot_training_state,
)

# what every decision needs, and how each value combines across ranks
_WITHOUT_SCALER = RankReduction([("total_norm", "max"), ("nonfinite_count", "max")])
_WITH_SCALER = RankReduction([("total_norm", "max"), ("nonfinite_count", "max"), ("loss_scale", "min")])

EVENTS_FILENAME = "gradstab_guard_events.jsonl"
SUMMARY_FILENAME = "gradstab_guard_summary.json"


class GradientExplosionError(RuntimeError):
    """Raised by :class:`ExplosionGuard` with ``raise_on_stop=True`` when the ladder reaches ``stop``.

    Example::

        try:
            trainer.fit(model)
        except GradientExplosionError as error:
            print(error)  # the step, the anomaly and the path of the JSON summary
    """


class ExplosionGuard(Callback):
    r"""Detect exploding gradients before the optimizer step and escalate: clip, skip, back off, roll back, stop.

    Acts in ``on_before_optimizer_step`` (after AMP unscaling, once per optimizer step under gradient
    accumulation, inside ``opt.step()`` under manual optimization) on the suite's shared gradient statistics,
    so together with :class:`~lightning_gradstab.GradNormMonitor` the gradients are measured once. The ladder
    and its defaults are described in :mod:`lightning_gradstab.policy` and ``docs/guard.md``.

    Every decision comes from numbers all-reduced across ranks (max norm, any rank's NaN, min loss scale) in a
    single collective, read on the host in a single sync per optimizer step, so all ranks clip, skip, roll back
    and stop on the same step. ``Trainer(gradient_clip_val=...)`` still applies after the guard: the tighter
    of the two clips wins.

    Logged (rank 0, ``opt{i}/`` inserted for optimizers after the first) every ``log_every_n_steps`` and on
    every intervention: ``gradstab/level``, ``clip_threshold``, ``clipped``, ``skipped``, ``lr_scale``,
    ``rollbacks``, ``zscore``, ``amp_overflow``. Events go to ``gradstab_guard_events.jsonl`` and the outcome to
    ``gradstab_guard_summary.json`` in the log directory; a table is printed at the end of ``fit``.

    Args:
        max_rung: highest rung: ``"observe"``, ``"clip"``, ``"tight_clip"``, ``"skip"``, ``"lr_backoff"``,
            ``"rollback"`` or ``"stop"`` (default).
        zscore_threshold: log-norm z-score that makes a spike, > 0.
        ema_decay: weight of the past in the running log-norm statistics, in (0, 1).
        warmup_steps: finite steps before spikes are judged, >= 1.
        log_std_floor: smallest log-norm standard deviation in z-scores, >= 0.
        growth_window: steps over which sustained growth is fitted, >= 3.
        growth_factor: norm growth that counts as an explosion, > 1: over ``growth_window``, or of the fast
            typical norm above the long-horizon reference (``drift``).
        drift_horizon_steps: horizon of the slow reference drift is measured against, above the fast EMA's
            ``1 / (1 - ema_decay)`` steps; ``None`` turns drift detection off.
        healthy_steps_to_deescalate: consecutive healthy steps that lower the level by one, >= 1.
        loss_scale_floor: fp16 loss scale below which the scaler has collapsed, > 0.
        budgets: anomalous steps per rung before escalating, e.g. ``{"skip": 2}``.
        tight_clip_ratio: ``tight_clip`` threshold as a multiple of the typical norm (default 1.0).
        backoff_factor: learning-rate multiplier per back-off, in (0, 1) (default 0.5).
        lr_recovery_steps: healthy steps to undo one back-off (default 100).
        snapshot_every: healthy steps between rollback snapshots (kept on CPU; default 100).
        raise_on_stop: raise :class:`GradientExplosionError` instead of stopping gracefully.
        log_every_n_steps: logging interval in optimizer steps (default: the trainer's).
        console_summary: print the table of actions at the end of ``fit``.

    Example::

        from lightning_gradstab import ExplosionGuard, GradNormMonitor

        trainer = pl.Trainer(callbacks=[GradNormMonitor(), ExplosionGuard()])
        clip_only = ExplosionGuard(max_rung="clip")
    """

    def __init__(
        self,
        max_rung: str = "stop",
        zscore_threshold: float = 2.5,
        ema_decay: float = 0.97,
        warmup_steps: int = 25,
        log_std_floor: float = 0.05,
        growth_window: int = 20,
        growth_factor: float = 10.0,
        drift_horizon_steps: int | None = 1000,
        healthy_steps_to_deescalate: int = 50,
        loss_scale_floor: float = 1.0,
        budgets: dict[str, int] | None = None,
        tight_clip_ratio: float | None = None,
        backoff_factor: float | None = None,
        lr_recovery_steps: int | None = None,
        snapshot_every: int | None = None,
        raise_on_stop: bool = False,
        log_every_n_steps: int | None = None,
        console_summary: bool = True,
    ) -> None:
        self.config = PolicyConfig(
            max_rung=max_rung,
            zscore_threshold=zscore_threshold,
            ema_decay=ema_decay,
            warmup_steps=warmup_steps,
            log_std_floor=log_std_floor,
            growth_window=growth_window,
            growth_factor=growth_factor,
            drift_horizon_steps=drift_horizon_steps,
            healthy_steps_to_deescalate=healthy_steps_to_deescalate,
            loss_scale_floor=loss_scale_floor,
            budgets=dict(budgets) if isinstance(budgets, dict) else budgets,
            tight_clip_ratio=tight_clip_ratio,
            backoff_factor=backoff_factor,
            lr_recovery_steps=lr_recovery_steps,
            snapshot_every=snapshot_every,
        )
        self.raise_on_stop = validate_flag(raise_on_stop, "raise_on_stop")
        self.log_every_n_steps = validate_interval(log_every_n_steps, "log_every_n_steps")
        self.console_summary = validate_flag(console_summary, "console_summary")
        self.policies: dict[int, ExplosionPolicy] = {}
        self.stop_reason: str | None = None
        self._loaded_policies: dict[int, dict[str, Any]] = {}
        self._snapshot: TrainingSnapshot | None = None
        self.snapshot_step: int | None = None
        self._saved_lrs: dict[int, tuple[torch.optim.Optimizer, list[Any]]] = {}
        self._step_hooks: dict[int, Any] = {}
        self._log_dir: Path | None = None
        self._unwritable_log_dir = False
        self._written_events: dict[int, int] = {}

    def policy(self, index: int = 0) -> ExplosionPolicy:
        """The policy (statistics, level, event log) of optimizer ``index``, created on first use."""
        if index not in self.policies:
            policy = ExplosionPolicy(self.config)
            if index in self._loaded_policies:
                policy.load_state_dict(self._loaded_policies.pop(index))
            self.policies[index] = policy
            self._written_events[index] = policy.state.events_recorded
        return self.policies[index]

    @property
    def level(self) -> int:
        """Current ladder level of the first optimizer's policy."""
        return self.policy(0).level

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = trainer.log_dir or trainer.default_root_dir  # a collective: every rank calls it
        self._log_dir = Path(directory)
        self._unwritable_log_dir = False
        add_tensorboard_layout(trainer, pl_module)  # only the charts this run's callbacks fill

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        raw = getattr(optimizer, "_optimizer", optimizer)
        self._restore_lr(raw)  # a scaled step the optimizer never ran (e.g. skipped by a GradScaler)
        index = optimizer_index(trainer, optimizer)
        stats = gradient_stats(trainer, pl_module, raw)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        values: dict[str, Any] = {"total_norm": stats.total_norm, "nonfinite_count": stats.nonfinite_count}
        if scaler is not None:
            values["loss_scale"] = scaler._scale if scaler._scale is not None else scaler._init_scale
        reduction = _WITH_SCALER if scaler is not None else _WITHOUT_SCALER
        reduced = reduction.reduce(values, distributed=trainer.world_size > 1)
        observation = Observation(
            total_norm=reduced["total_norm"],
            # an Inf total from finite gradients (a float32 overflow of the sum of squares) cannot be clipped
            nonfinite=reduced["nonfinite_count"] > 0 or reduced["total_norm"] >= FLOAT32_MAX,
            loss_scale=reduced.get("loss_scale"),
        )
        policy = self.policy(index)
        decision = policy.step(observation)
        self._act(trainer, pl_module, raw, decision, observation)
        self._report(trainer, index, policy, decision)

    def _act(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        decision: Decision,
        observation: Observation,
    ) -> None:
        healthy = decision.anomaly is None
        if (
            healthy
            and self.config.max_level >= RUNGS.index("rollback")
            and (decision.snapshot or self._snapshot is None)
        ):
            self._snapshot = snapshot_training_state(pl_module, trainer.optimizers, into=self._snapshot)
            self.snapshot_step = decision.step
        if decision.rollback:
            if self._snapshot is None:
                rank_zero_warn("ExplosionGuard: rollback requested but no snapshot exists yet; skipping the step.")
            else:
                restore_training_state(pl_module, trainer.optimizers, self._snapshot)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if decision.skip:
            for parameter in params:  # the optimizer skips None grads: no weight and no state change
                parameter.grad = None
        elif decision.clip_coefficient < 1.0:
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, decision.clip_coefficient)
        if decision.lr_scale != 1.0 and not decision.skip and not observation.nonfinite:
            self._scale_lr(optimizer, decision.lr_scale)
        if decision.stop:
            self.stop_reason = (
                f"step {decision.step}: {decision.anomaly} at level {decision.level} ({decision.rung}) "
                "after every lower rung's budget was spent"
            )
            trainer.should_stop = True
            self._write_summary(trainer)
            if self.raise_on_stop:
                raise GradientExplosionError(
                    f"ExplosionGuard stopped training at {self.stop_reason}; summary: {self._summary_path()}"
                )

    def _scale_lr(self, optimizer: torch.optim.Optimizer, lr_scale: float) -> None:
        # applied just before the step and undone right after it, so LR schedulers never see the scaled value
        self._saved_lrs[id(optimizer)] = (optimizer, [group["lr"] for group in optimizer.param_groups])
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * lr_scale
        if id(optimizer) not in self._step_hooks:
            self._step_hooks[id(optimizer)] = optimizer.register_step_post_hook(
                lambda opt, args, kwargs: self._restore_lr(opt)
            )

    def _restore_lr(self, optimizer: torch.optim.Optimizer) -> None:
        saved = self._saved_lrs.pop(id(optimizer), None)
        if saved is not None:
            for group, lr in zip(saved[0].param_groups, saved[1], strict=True):
                group["lr"] = lr

    def _report(self, trainer: pl.Trainer, index: int, policy: ExplosionPolicy, decision: Decision) -> None:
        step = logging_step(trainer)
        interval = self.log_every_n_steps or trainer.log_every_n_steps
        new_events = policy.events_since(self._written_events.get(index, 0))
        self._written_events[index] = policy.state.events_recorded
        if not new_events and step % max(interval, 1) != 0:
            return
        prefix = "gradstab/" if index == 0 else f"gradstab/opt{index}/"
        counts = policy.state.counts
        metrics = {
            "level": float(decision.level),
            "clipped": float("clip" in decision.actions),
            "skipped": float(decision.skip),
            "lr_scale": decision.lr_scale if not decision.skip else policy.state.lr_scale,
            "rollbacks": float(counts.get("rollback", 0)),
            "zscore": decision.zscore,
            "amp_overflow": float(counts.get("amp_overflow", 0)),
        }
        if math.isfinite(decision.clip_threshold):
            metrics["clip_threshold"] = decision.clip_threshold
        log_metrics(trainer, {prefix + name: value for name, value in metrics.items()}, step)
        if new_events and trainer.global_rank == 0 and self._log_dir is not None:
            lines = "".join(json.dumps({"optimizer": index, "logging_step": step, **e}) + "\n" for e in new_events)
            self._write_file(self._log_dir / EVENTS_FILENAME, lines, mode="a")

    def summary(self) -> dict[str, Any]:
        """What the guard did: final level, counts per action, worst spikes, stop reason, per optimizer."""
        return {
            "stopped": self.stop_reason is not None,
            "stop_reason": self.stop_reason,
            "optimizers": {
                str(index): {
                    "final_level": policy.level,
                    "final_rung": RUNGS[policy.level],
                    "lr_scale": policy.state.lr_scale,
                    "counts": policy.counts,
                    "worst_spikes": policy.worst_spikes,
                }
                for index, policy in sorted(self.policies.items())
            },
        }

    def _summary_path(self) -> Path | None:
        return None if self._log_dir is None else self._log_dir / SUMMARY_FILENAME

    def _write_summary(self, trainer: pl.Trainer) -> None:
        path = self._summary_path()
        if trainer.global_rank == 0 and path is not None:
            self._write_file(path, json.dumps(self.summary(), indent=2), mode="w")

    def _write_file(self, path: Path, text: str, mode: str) -> None:
        # the record of a decision is monitoring: a full disk or a bad log dir must not stop training, and
        # the decision itself already stands (it is also kept in ``state_dict``)
        if self._unwritable_log_dir:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, mode) as stream:
                stream.write(text)
        except OSError as error:
            self._unwritable_log_dir = True
            rank_zero_warn(
                f"lightning_gradstab: ExplosionGuard cannot write {str(path)!r} ({error!r}); its event log and "
                "summary are not written to disk from now on (decisions and scalar logging go on)."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_summary(trainer)
        if self.console_summary and trainer.global_rank == 0 and self.policies:
            _print_summary(self.summary(), trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            print_fit_summary(trainer)  # the suite's one end-of-fit summary, printed by whichever callback is first
        for optimizer, _ in list(self._saved_lrs.values()):
            self._restore_lr(optimizer)
        for handle in self._step_hooks.values():
            handle.remove()
        self._step_hooks.clear()
        self._snapshot = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "policies": {str(index): policy.state_dict() for index, policy in self.policies.items()},
            "stop_reason": self.stop_reason,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version("ExplosionGuard", state_dict)
        self.policies.clear()
        self._loaded_policies = {int(index): state for index, state in state_dict["policies"].items()}
        self.stop_reason = state_dict["stop_reason"]
        for index in list(self._loaded_policies):
            self.policy(index)


def _print_summary(summary: dict[str, Any], trainer: pl.Trainer | None = None) -> None:
    from rich.table import Table

    table = Table(title="ExplosionGuard summary")
    for column in ("optimizer", "final level", "lr scale", "actions", "worst spikes (step: z / norm)"):
        table.add_column(column)
    for index, entry in summary["optimizers"].items():
        actions = ", ".join(f"{name}={count}" for name, count in sorted(entry["counts"].items())) or "none"
        spikes = "; ".join(
            f"{s['step']}: {s['zscore']:.1f} / {s['total_norm']:.3g}"
            if s["total_norm"] is not None
            else f"{s['step']}: {s['zscore']:.1f} / nan"
            for s in entry["worst_spikes"]
        )
        level = f"{entry['final_level']} ({entry['final_rung']})"
        table.add_row(index, level, f"{entry['lr_scale']:.3g}", actions, spikes or "none")
    stop = [f"[bold red]stopped:[/] {summary['stop_reason']}"] if summary["stopped"] else []
    console_print(table, *stop, trainer=trainer)  # through the progress bar, which would draw over it
