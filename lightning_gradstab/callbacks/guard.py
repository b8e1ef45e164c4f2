"""ExplosionGuard: catch a gradient explosion before the update lands, escalate, recover, and say what happened.

A thin Lightning adapter over :class:`~lightning_gradstab.policy.ExplosionPolicy`. Per optimizer step it reads
the shared gradient statistics, reduces the few numbers a decision needs across ranks in one collective, reads
them on the host once, and carries out the policy's decision (clip, skip, scale the learning rate, roll back,
stop) identically on every rank.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from rich.markup import escape
from typing_extensions import override

from lightning_gradstab.arguments import check_flag, check_interval
from lightning_gradstab.callbacks._guard_summary import effective_lr_metric, guard_advice, print_guard_summary
from lightning_gradstab.callbacks._optimizers import is_scale_invariant, scheduled_lr, sgd_step_size
from lightning_gradstab.callbacks._shared import (
    STATE_VERSION,
    SuiteCallback,
    SummaryContribution,
    add_tensorboard_layout,
    check_state_version,
    gradient_stats,
    log_metrics,
    logging_step,
    mark_fit_start,
    optimizer_index,
    print_fit_summary,
)
from lightning_gradstab.console import console_print
from lightning_gradstab.distributed import refuse_unsupported_strategy
from lightning_gradstab.guard.config import EVIDENCE, RUNGS, PolicyConfig
from lightning_gradstab.guard.decision import Decision
from lightning_gradstab.guard.detect import Observation
from lightning_gradstab.guard.ladder import ExplosionPolicy
from lightning_gradstab.guard.policy_state import READABLE_VERSIONS, upgraded_policy_state
from lightning_gradstab.guard.snapshot import RollbackSnapshot
from lightning_gradstab.guard.snapshot_budget import validate_snapshot_options
from lightning_gradstab.guard.step_buffers import StepBuffers
from lightning_gradstab.running import FLOAT32_MAX, RankReduction, ReduceKind
from lightning_gradstab.state_checks import POLICY_OPTIONAL, check_state, policy_rules
from lightning_gradstab.tensorboard import GUARD_CHARTS

# what every decision needs, and how each value combines across ranks: the largest norm and loss, whether any
# rank and whether every rank saw non-finite gradients, the weights' norm (identical on every rank) and the
# smallest loss scale; and whether every rank holds a rollback snapshot (a disk write can fail on one rank only)
_FIELDS: list[tuple[str, ReduceKind]] = [
    ("total_norm", "max"),
    ("nonfinite_count", "max"),
    ("nonfinite_count_everywhere", "min"),
    ("loss", "max_worst"),  # a non-finite loss (NaN, +-Inf) reads as FLOAT32_MAX: the worst
    ("weight_norm", "max"),
    ("snapshot_available", "min"),
]
_WITHOUT_SCALER = RankReduction(_FIELDS)
_WITH_SCALER = RankReduction([*_FIELDS, ("loss_scale", "min")])
# on rollback steps: every rank's snapshot verified, and the state of a checked rollback kept aside
_SNAPSHOT_AGREEMENT = RankReduction([("usable", "min"), ("set_aside", "min")])
_NO_LOSS = -FLOAT32_MAX  # stands for "this rank had no loss this step" in the max over ranks

WEIGHT_NORM_EVERY = 10
"""Optimizer steps between measurements of the weight norm (plain SGD only; weights change slowly)."""

SNAPSHOT_CHECKPOINT_KEY = "gradstab_guard_snapshot"
"""Where :meth:`ExplosionGuard.on_save_checkpoint` keeps the rollback snapshot in a Lightning checkpoint."""

SNAPSHOT_DIRNAME = "gradstab_rollback"
"""Folder under the log directory that holds disk rollback snapshots when ``snapshot_dir`` is not given."""

_SNAPSHOT_DEFAULTS: dict[str, Any] = {
    "snapshot_keep": "weights+optimizer",
    "snapshot_location": "memory",
    "snapshot_max_bytes": "auto",
    "snapshot_dir": None,
}

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


class ExplosionGuard(SuiteCallback):
    r"""Detect exploding gradients before the optimizer step and escalate: clip, skip, back off, roll back, stop.

    Acts in ``on_before_optimizer_step`` (after AMP unscaling, once per optimizer step under gradient
    accumulation, inside ``opt.step()`` under manual optimization) on the suite's shared gradient statistics,
    so together with :class:`~lightning_gradstab.GradNormMonitor` the gradients are measured once. The ladder
    and its defaults are described in :mod:`lightning_gradstab.policy` and ``docs/guard.md``.

    Besides the gradient norm it watches the training loss (captured in ``on_before_backward``, unscaled under
    fp16, summed over accumulated micro-batches, kept on the device) and, for plain SGD, the size of the step
    relative to the weights, so a run that is unstable from its first step, or a bad batch under Adam, is
    caught although the run's own gradient history looks normal.

    Every decision comes from numbers all-reduced across ranks (max norm, max loss, any rank's and every
    rank's NaN, min loss scale) in a single collective, read on the host in a single sync per optimizer step,
    so all ranks clip, skip, roll back and stop on the same step. ``Trainer(gradient_clip_val=...)`` still
    applies after the guard: the tighter of the two clips wins.

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
        loss_zscore_threshold: loss z-score above which the step's batch is skipped before it lands, > 0
            (OLMo's 6); ``None`` turns loss spikes off.
        loss_rise_tolerance: rise of the smoothed loss above its lowest value, as a fraction of it, that is a
            divergence (roll back and halve the learning rate), > 0; ``None`` turns it off.
        max_update_ratio: largest ``lr / (1 - momentum) * |g| / |w|`` a plain SGD step may take, > 0 (the
            gradient is clipped to it); ``None`` turns it off. Other optimizers are not affected.
        max_norm: an absolute ceiling on the gradient norm (ZClip's ``max_grad_norm``), > 0. ``"auto"`` (the
            default): 1.0 for optimizers whose step ignores the gradient's scale (Adam, AdamW, RMSprop, Adagrad
            and any optimizer with ``betas``, see :data:`~lightning_gradstab.policy.SCALE_INVARIANT_MAX_NORM`),
            none for SGD and the others, where a ceiling would lower the learning rate; ``None``: no ceiling.
        budgets: anomalous steps per rung before escalating, e.g. ``{"skip": 2}``.
        tight_clip_ratio: ``tight_clip`` threshold as a multiple of the typical norm (default 1.0).
        backoff_factor: learning-rate multiplier per back-off, in (0, 1) (default 0.5).
        lr_recovery_steps: healthy steps to undo one back-off (default 25).
        snapshot_every: healthy steps between rollback snapshots (default 100; earlier in a run, every time half
            the steps so far have passed, so a rollback never discards more than about half the progress).
        snapshot_keep: what a snapshot holds: ``"weights+optimizer"`` (default: an exact rollback, Adam's
            moments included) or ``"weights"`` (parameters, buffers and the fp16 loss scale, a third of the bytes
            with Adam; a rollback then leaves the optimizer state as it is).
        snapshot_location: ``"memory"`` (host RAM, default) or ``"disk"`` (a file written by a background
            thread, see :class:`~lightning_gradstab.guard.snapshot.RollbackSnapshot`).
        snapshot_max_bytes: most host RAM a snapshot may hold: ``"auto"`` (default: a share of this host's RAM
            per rank), a positive int, or ``None`` (no bound); a larger memory snapshot goes to disk (said once).
        snapshot_dir: folder of disk snapshots; ``None``: ``gradstab_rollback`` in the trainer's log directory.
            A disk snapshot is not carried in checkpoints (a memory one is): after a resume the next healthy
            snapshot step takes a new one. The four ``snapshot_*`` options need ``max_rung`` at ``"rollback"``
            or above.
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
        loss_zscore_threshold: float | None = 6.0,
        loss_rise_tolerance: float | None = 0.5,
        max_update_ratio: float | None = 1.0,
        max_norm: float | Literal["auto"] | None = "auto",
        budgets: dict[str, int] | None = None,
        tight_clip_ratio: float | None = None,
        backoff_factor: float | None = None,
        lr_recovery_steps: int | None = None,
        snapshot_every: int | None = None,
        snapshot_keep: Literal["weights", "weights+optimizer"] = "weights+optimizer",
        snapshot_location: Literal["memory", "disk"] = "memory",
        snapshot_max_bytes: int | Literal["auto"] | None = "auto",
        snapshot_dir: str | os.PathLike[str] | None = None,
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
            loss_zscore_threshold=loss_zscore_threshold,
            loss_rise_tolerance=loss_rise_tolerance,
            max_update_ratio=max_update_ratio,
            max_norm=max_norm,
            budgets=dict(budgets) if isinstance(budgets, Mapping) else budgets,  # a Hydra DictConfig too
            tight_clip_ratio=tight_clip_ratio,
            backoff_factor=backoff_factor,
            lr_recovery_steps=lr_recovery_steps,
            snapshot_every=snapshot_every,
        )
        validate_snapshot_options(snapshot_keep, snapshot_location, snapshot_max_bytes, None, prefix="snapshot_")
        if snapshot_dir is not None and not isinstance(snapshot_dir, (str, os.PathLike)):
            raise TypeError(f"`snapshot_dir` must be a path (str or os.PathLike) or None, got {snapshot_dir!r}")
        given = {
            "snapshot_keep": snapshot_keep,
            "snapshot_location": snapshot_location,
            "snapshot_max_bytes": snapshot_max_bytes,
            "snapshot_dir": snapshot_dir,
        }
        if not self.config.allows("rollback"):
            for option, value in given.items():
                if value != _SNAPSHOT_DEFAULTS[option]:
                    raise ValueError(
                        f"`{option}`={value!r} configures rung 'rollback', which is above `max_rung`={max_rung!r}; "
                        f"raise `max_rung` to at least 'rollback' or drop `{option}`"
                    )
        self._snapshot_dir_given = snapshot_dir is not None
        self._rollback = RollbackSnapshot(snapshot_keep, snapshot_location, snapshot_max_bytes, snapshot_dir)
        # the state of a divergence step, kept aside while its rollback is checked (policy.ROLLBACK_CHECK_STEPS):
        # put back when the check finds that the objective moved, not the weights
        self._set_aside = RollbackSnapshot(snapshot_keep, snapshot_location, snapshot_max_bytes, snapshot_dir)
        self._warned_unavailable = False
        self.raise_on_stop = check_flag(raise_on_stop, "raise_on_stop")
        self.log_every_n_steps = check_interval(log_every_n_steps, "log_every_n_steps")
        self.console_summary = check_flag(console_summary, "console_summary")
        self.policies: dict[int, ExplosionPolicy] = {}
        self.stop_reason: str | None = None
        self._loaded_policies: dict[int, dict[str, Any]] = {}
        self._saved_lrs: dict[int, tuple[torch.optim.Optimizer, list[Any]]] = {}
        self._step_hooks: dict[int, Any] = {}
        self._log_dir: Path | None = None
        self._unwritable_log_dir = False
        self._written_events: dict[int, int] = {}
        self._step_loss: torch.Tensor | None = None  # this optimizer step's loss so far, on the device
        self._weight_norms: dict[int, float] = {}  # the last measured weight norm per optimizer (plain SGD)
        self._without_lr: list[str] = []
        self._base_lrs: dict[int, float] = {}  # each optimizer's first param group lr, read at the end of fit
        self._step_buffers = StepBuffers()  # buffers as before this step's forward: a skip leaves no trace
        self._buffers_saved = False  # this optimizer step's buffers are saved (its first forward ran)
        self._loss_unmeasured = False  # a micro-batch of this step had a non-scalar loss (backward with gradient=)
        self._warned_once: set[str] = set()
        self._competing_losses: str | None = None  # why the loss rules are off for every optimizer of this fit
        self._skip_lines = 0  # skips said on the console so far (the first few each fit; the rest are counted)

    def policy(self, index: int = 0) -> ExplosionPolicy:
        """The policy (statistics, level, event log) of optimizer ``index``, created on first use."""
        if index not in self.policies:
            policy = ExplosionPolicy(self.config)
            if index in self._loaded_policies:
                policy.load_state_dict(self._loaded_policies.pop(index))
            self.policies[index] = policy
            self._written_events[index] = policy.events_recorded
        return self.policies[index]

    @property
    def snapshot_step(self) -> int | None:
        """The step the current rollback snapshot was taken at (``None``: there is none)."""
        return self._rollback.step if self._rollback.available else None

    @property
    def rollback_snapshot(self) -> RollbackSnapshot:
        """The store of the rollback snapshot (where it lives, its size in bytes, its step)."""
        return self._rollback

    @property
    def level(self) -> int:
        """Current ladder level of the first optimizer's policy."""
        return self.policy(0).level

    def guard_events(self) -> list[dict[str, Any]]:
        """Every optimizer's kept events, oldest first within each, with its ``optimizer`` index (copies).

        The keys are those of :attr:`lightning_gradstab.policy.ExplosionPolicy.events`; this is the read-only
        accessor other callbacks (``ArchitectureAdvisor``) read the guard's decisions through.

        Example::

            escalations = [e for e in guard.guard_events() if e["level"] > e["previous_level"]]
        """
        return [
            {"optimizer": index, **event} for index, policy in sorted(self.policies.items()) for event in policy.events
        ]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a callback reused for another fit (a sweep loop, an Optuna objective, a notebook) starts it clean: the
        # last fit's level, statistics and snapshot describe another model. Lightning loads a checkpoint's
        # state after ``setup``, so a resumed fit gets it back; a second ``fit`` of the same trainer goes on.
        if stage != "fit" or trainer.global_step > 0:
            return
        self.policies.clear()
        self._loaded_policies.clear()
        self.stop_reason = None
        self._written_events.clear()
        self._weight_norms.clear()
        self._base_lrs.clear()
        self._step_loss, self._loss_unmeasured, self._buffers_saved = None, False, False
        self._step_buffers.clear()
        self._warned_unavailable = False
        self._rollback.new_run()
        self._set_aside.new_run()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_unsupported_strategy(trainer.strategy, "ExplosionGuard")  # DeepSpeed: no readable gradients
        mark_fit_start(trainer)  # the end-of-fit summary lists only the report files written from here on
        directory = trainer.log_dir or trainer.default_root_dir  # a collective: every rank calls it
        self._log_dir = Path(directory)
        self._unwritable_log_dir = False
        if not self._snapshot_dir_given:
            self._rollback.directory = self._set_aside.directory = self._log_dir / SNAPSHOT_DIRNAME
        # ranks on this host share the "auto" bound
        self._rollback.local_processes = self._set_aside.local_processes = trainer.num_devices
        if self._rollback.requested_location == "disk" or self._rollback.max_bytes is not None:
            leftover = self._rollback.leftover_files()
            if leftover:  # never deleted here: only the run that wrote a file deletes it
                rank_zero_warn(
                    f"ExplosionGuard: {len(leftover)} rollback snapshot file(s) left by processes that are gone (a "
                    f"SIGKILL or a crash) in {str(leftover[0].parent)!r}: {', '.join(p.name for p in leftover[:3])}"
                    f"{' ...' if len(leftover) > 3 else ''}; delete them to free the disk space."
                )
        add_tensorboard_layout(trainer, pl_module)  # only the charts this run's callbacks fill

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drop_unusable_snapshot(pl_module, trainer.optimizers)  # a checkpoint's, against the optimizers too
        self._competing_losses, self._skip_lines = None, 0
        if not pl_module.automatic_optimization and len(trainer.optimizers) > 1:
            # several optimizers stepped by hand are almost always adversarial (a GAN) or otherwise competing
            # objectives: each loss rises when the other model improves, so neither may be judged as one that falls
            self._competing_losses = (
                f"{len(trainer.optimizers)} optimizers under manual optimization: competing losses (e.g. a GAN)"
            )
        if not self._rollback.available:  # resumed from a checkpoint that carried no snapshot: take a new one first
            for policy in self.policies.values():
                policy.forget_snapshot()
        if not self.config.allows("lr_backoff"):
            return
        self._without_lr = [
            f"optimizer {index} ({type(getattr(optimizer, '_optimizer', optimizer)).__name__})"
            for index, optimizer in enumerate(trainer.optimizers)
            if any(not isinstance(group.get("lr"), (int, float, torch.Tensor)) for group in optimizer.param_groups)
        ]
        if self._without_lr:
            rank_zero_warn(
                f"ExplosionGuard: {', '.join(self._without_lr)} has param groups without a numeric 'lr', so the "
                "'lr_backoff' rung cannot scale its learning rate: there it skips steps only (rollback and stop "
                "still work). Pass max_rung='skip' to silence this, or use an optimizer with an 'lr'."
            )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if not self._buffers_saved:  # the first forward of an optimizer step: keep what its buffers were
            self._step_buffers.save(pl_module)
            self._buffers_saved = True

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # the loss of every micro-batch (and every manual_backward) of the coming optimizer step, on the device;
        # Lightning hands it over already divided by accumulate_grad_batches (so the sum is the step's mean) and,
        # under fp16, already multiplied by the GradScaler's scale
        if loss.numel() != 1:  # manual_backward(losses, gradient=...): the step's scalar loss is not known
            self._loss_unmeasured = True
            self._warn_once(
                "vector loss",
                f"ExplosionGuard: a backward of a loss of shape {tuple(loss.shape)} (manual_backward with "
                "`gradient=`): the guard judges such steps by their gradients only, not by their loss (said once).",
            )
            return
        value = loss.detach().float().reshape(())
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler._scale is not None:
            value = value / scaler._scale
        self._step_loss = value if self._step_loss is None else self._step_loss + value

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        raw = getattr(optimizer, "_optimizer", optimizer)
        self._restore_lr(raw)  # a scaled step the optimizer never ran (e.g. skipped by a GradScaler)
        index = optimizer_index(trainer, optimizer)
        policy = self.policy(index)
        if self._competing_losses is not None:
            policy.disable_loss_rules(self._competing_losses)
        stats = gradient_stats(trainer, pl_module, raw)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        loss, self._step_loss = self._step_loss, None  # one optimizer step consumes the losses since the last
        if self._loss_unmeasured:
            loss, self._loss_unmeasured = None, False
        step_size = sgd_step_size(raw) if self.config.max_update_ratio is not None else None
        weight_norm: torch.Tensor | float = self._weight_norms.get(index, 0.0)
        if step_size is not None and (policy.steps % WEIGHT_NORM_EVERY == 0 or index not in self._weight_norms):
            weight_norm = stats.weight_norms().square().sum().sqrt()
        values: dict[str, Any] = {
            "total_norm": stats.total_norm,
            "nonfinite_count": stats.nonfinite_count,
            "nonfinite_count_everywhere": stats.nonfinite_count,
            "loss": _NO_LOSS if loss is None else loss,
            "weight_norm": weight_norm,
            "snapshot_available": float(self._snapshot_ready()),
        }
        if scaler is not None:
            values["loss_scale"] = scaler._scale if scaler._scale is not None else scaler._init_scale
        reduction = _WITH_SCALER if scaler is not None else _WITHOUT_SCALER
        reduced = reduction.reduce(values, distributed=trainer.world_size > 1)
        if step_size is not None:
            self._weight_norms[index] = reduced["weight_norm"]
        loss_value = reduced["loss"]
        observation = Observation(
            total_norm=reduced["total_norm"],
            # an Inf total from finite gradients (a float32 overflow of the sum of squares) cannot be clipped
            nonfinite=max(
                reduced["nonfinite_count"] > 0, reduced["total_norm"] >= FLOAT32_MAX, loss_value >= FLOAT32_MAX
            ),
            loss_scale=reduced.get("loss_scale"),
            rank_local=reduced["nonfinite_count"] > 0 and reduced["nonfinite_count_everywhere"] == 0,
            loss=None if loss_value <= 0.5 * _NO_LOSS or loss_value >= FLOAT32_MAX else loss_value,
            weight_norm=reduced["weight_norm"] if step_size is not None else None,
            step_size=step_size,
            lr=scheduled_lr(raw),
            # max_norm="auto" is the ceiling of single-objective recipes (LMs, classifiers); adversarial games are
            # trained without one (DCGAN, StyleGAN), their gradient norm being part of the game's dynamics
            scale_invariant=is_scale_invariant(raw) and self._competing_losses is None,
        )
        decision = policy.step(observation)
        snapshot_everywhere = reduced["snapshot_available"] > 0
        if observation.rank_local and scaler is not None:
            _clear_found_inf(scaler, raw)  # not an overflow: no rank may lower its scale alone
        self._act(trainer, pl_module, raw, decision, observation, scaler, snapshot_everywhere)
        self._buffers_saved = False  # the next batch starts a new optimizer step
        self._report(trainer, index, policy, decision)

    def _act(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        decision: Decision,
        observation: Observation,
        scaler: Any = None,
        snapshot_everywhere: bool = True,
    ) -> None:
        if decision.snapshot:
            self._rollback.take(pl_module, trainer.optimizers, scaler, step=decision.step)
        rolled_back = False
        if decision.rollback:
            checked = decision.rollback_check == "start"
            if checked and snapshot_everywhere:  # the divergence step's own state, in case the check undoes it
                self._set_aside.take(pl_module, trainer.optimizers, scaler, step=decision.step)
            # every rank restores or none does: one rank without a usable snapshot (a failed or unfinished disk
            # write, a file removed or corrupted) makes all of them skip the step instead, so the replicas stay
            # identical. The file's checksum and the model's structure are checked first, agreed on in one
            # more collective on rollback steps only (a decision every rank took alike)
            problem = self._rollback.problem(pl_module, trainer.optimizers) if snapshot_everywhere else None
            set_aside = checked and snapshot_everywhere and self._set_aside.available
            if snapshot_everywhere and trainer.world_size > 1:
                agreed = _SNAPSHOT_AGREEMENT.reduce(
                    {
                        "usable": torch.tensor(0.0 if problem else 1.0, device=pl_module.device),
                        "set_aside": torch.tensor(float(set_aside), device=pl_module.device),
                    },
                    distributed=True,
                )
                snapshot_everywhere, set_aside = agreed["usable"] > 0, agreed["set_aside"] > 0
            if checked and not (set_aside and snapshot_everywhere and problem is None):
                self.policy(optimizer_index(trainer, optimizer)).abandon_rollback_check()
                self._set_aside.close()
            if snapshot_everywhere and problem is None:
                self._rollback.restore(pl_module, trainer.optimizers, scaler)
                self._step_buffers.resync()
                rolled_back = True
            else:
                if not self._warned_unavailable:
                    self._warned_unavailable = True
                    rank_zero_warn(
                        f"ExplosionGuard: step {decision.step} asks for a rollback but a rank holds no usable "
                        "rollback snapshot (none taken yet, a disk write failed or is still in flight, it did not "
                        "fit, its file was removed or changed, or it does not match the model"
                        + (f": {problem}" if problem else "")
                        + "); every rank skips the step instead (said once)."
                    )
                for each in self.policies.values():  # the next healthy step takes a new snapshot
                    each.forget_snapshot()
        if decision.rollback_check in ("undo", "keep"):
            self._end_rollback_check(trainer, pl_module, decision, scaler)
            rolled_back = decision.rollback_check == "undo"
        if decision.reset_loss_scale and scaler is not None and scaler._scale is not None:
            scaler._scale.fill_(scaler._init_scale)  # a device write on every rank alike: no sync
            scaler._growth_tracker.zero_()
        if decision.skip:
            for group in optimizer.param_groups:  # the optimizer skips None grads: no weight and no state change
                for parameter in group["params"]:
                    parameter.grad = None
            if not rolled_back:  # nor a buffer change: the forward's running statistics are put back
                self._step_buffers.restore()
        elif decision.clip_coefficient < 1.0:
            # one foreach call: it groups the gradients by device and dtype itself (one fused kernel per group
            # on an accelerator), reads nothing back, and is bound by one read and one write of every gradient
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch._foreach_mul_(grads, decision.clip_coefficient)
        if decision.lr_scale != 1.0 and not decision.skip and not observation.nonfinite:
            self._scale_lr(optimizer, decision.lr_scale)
        if decision.stop:
            why = (
                "with the learning rate already backed off below 1/1000"
                if decision.anomaly == "divergence"
                else "after every lower rung's budget was spent"
            )
            self.stop_reason = (
                f"step {decision.step}: {decision.anomaly} at level {decision.level} ({decision.rung}) {why}"
                + (f" ({decision.evidence} evidence)" if decision.evidence else "")
            )
            trainer.should_stop = True
            self._write_summary(trainer)
            if self.raise_on_stop:
                raise GradientExplosionError(
                    f"ExplosionGuard stopped training at {self.stop_reason}; summary: {self._summary_path()}"
                )

    def _end_rollback_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, decision: Decision, scaler: Any
    ) -> None:
        """Put the divergence step's state back when the check found that the objective moved (every rank or
        none, as a rollback), then drop it."""
        if decision.rollback_check == "undo":
            problem = self._set_aside.problem(pl_module, trainer.optimizers) if self._set_aside.usable else "gone"
            if trainer.world_size > 1:
                usable = torch.tensor(0.0 if problem else 1.0, device=pl_module.device)
                agreed = _SNAPSHOT_AGREEMENT.reduce(
                    {"usable": usable, "set_aside": usable}, distributed=True
                )["usable"] > 0
                problem = problem or (None if agreed else "not usable on every rank")
            if problem is None:
                self._set_aside.restore(pl_module, trainer.optimizers, scaler)
                self._step_buffers.resync()
            else:
                rank_zero_warn(
                    f"ExplosionGuard: step {decision.step}: the rollback check found that the objective moved, but "
                    f"the state kept aside cannot be put back ({problem}); training goes on from the snapshot."
                )
        self._set_aside.close()

    def _snapshot_ready(self) -> bool:
        """Whether this rank holds a snapshot a restore can load now (a host-side check: no device sync).

        A disk write still in flight counts as not ready: its outcome is not known yet, and a rank whose write
        then failed could not restore while the others did. A disk snapshot's file must still be the one
        written, with its size (a ``stat``); its checksum is checked on a rollback step.
        """
        return self._rollback.usable

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned_once:
            self._warned_once.add(key)
            rank_zero_warn(message)

    def _drop_unusable_snapshot(self, pl_module: pl.LightningModule, optimizers: Any) -> None:
        """Drop a snapshot restored from a checkpoint that does not fit this model (a buffer added to the code
        since, another architecture) or these optimizers (``None``: not set up yet), with one warning: it is
        checked when loaded, not found out at the first rollback."""
        if self._rollback.location != "memory":
            return
        problem = self._rollback.problem(pl_module, optimizers)
        if problem is not None:
            self._rollback.close()
            self._warn_once(
                "checkpoint snapshot",
                f"ExplosionGuard: the checkpoint's rollback snapshot cannot be used ({problem}); it is dropped and "
                "a new one is taken at the next healthy step.",
            )

    def _scale_lr(self, optimizer: torch.optim.Optimizer, lr_scale: float) -> None:
        # applied just before the step and undone right after it, so LR schedulers never see the scaled value
        self._saved_lrs[id(optimizer)] = (optimizer, [group.get("lr") for group in optimizer.param_groups])
        for group in optimizer.param_groups:
            if isinstance(group.get("lr"), (int, float, torch.Tensor)):  # groups without one were warned about
                group["lr"] = group["lr"] * lr_scale
        if id(optimizer) not in self._step_hooks:
            self._step_hooks[id(optimizer)] = optimizer.register_step_post_hook(
                lambda opt, args, kwargs: self._restore_lr(opt)
            )

    def _restore_lr(self, optimizer: torch.optim.Optimizer) -> None:
        saved = self._saved_lrs.pop(id(optimizer), None)
        if saved is not None:
            for group, lr in zip(saved[0].param_groups, saved[1], strict=True):
                if lr is not None:
                    group["lr"] = lr

    def _report(self, trainer: pl.Trainer, index: int, policy: ExplosionPolicy, decision: Decision) -> None:
        step = logging_step(trainer)
        # Trainer.log_every_n_steps is set by Lightning's logger connector at init; the class does not declare it
        interval = self.log_every_n_steps or trainer.log_every_n_steps  # type: ignore[attr-defined]
        new_events = policy.events_since(self._written_events.get(index, 0))
        self._written_events[index] = policy.events_recorded
        if not new_events and step % max(interval, 1) != 0:
            return
        # the monitor's naming: one optimizer unscoped, several each under opt{i}/ (opt0 included)
        prefix = "gradstab/" if len(trainer.optimizers) <= 1 else f"gradstab/opt{index}/"
        counts = policy.counts
        metrics = {
            "level": float(decision.level),
            "clipped": float("clip" in decision.actions),
            "skipped": float(decision.skip),
            "lr_scale": decision.lr_scale if not decision.skip else policy.lr_scale,
            "rollbacks": float(counts.get("rollback", 0)),
            "zscore": decision.zscore,
            "amp_overflow": float(counts.get("amp_overflow", 0)),
        }
        if math.isfinite(decision.clip_threshold):
            metrics["clip_threshold"] = decision.clip_threshold
        scalars = {prefix + name: value for name, value in metrics.items()}
        scalars.update(effective_lr_metric(trainer, index, metrics["lr_scale"]))  # beside LearningRateMonitor's
        log_metrics(trainer, scalars, step)
        for event in new_events:
            line = _move_line(index, event) if trainer.global_rank == 0 else None
            if line is not None and not (event["actions"] == ["skip"] and self._quiet_skip()):
                console_print(escape(line), trainer=trainer)
        if new_events and trainer.global_rank == 0 and self._log_dir is not None:
            lines = "".join(json.dumps({"optimizer": index, "logging_step": step, **e}) + "\n" for e in new_events)
            self._write_file(self._log_dir / EVENTS_FILENAME, lines, mode="a")

    def _quiet_skip(self) -> bool:
        """Whether a plain skip goes unsaid: the first :data:`SKIP_LINES` of a fit are said, the rest counted."""
        self._skip_lines += 1
        if self._skip_lines == SKIP_LINES + 1:
            return False  # said once more, as the last one: see _move_line
        return self._skip_lines > SKIP_LINES

    @override
    def summary_contribution(self) -> SummaryContribution:
        # a guard built with console_summary=False prints nothing at the end of fit, in its table or there
        if not self.console_summary:
            return SummaryContribution()
        summary = self.summary()
        return SummaryContribution(guard_summaries=(summary,) if summary["optimizers"] else ())

    @override
    def tensorboard_charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        return list(GUARD_CHARTS)

    def summary(self) -> dict[str, Any]:
        """What the guard did, per optimizer, as plain data (also written to ``gradstab_guard_summary.json``).

        Per optimizer: final level and rung, ``lr_scale`` (the multiplier the run ended at after back-offs) and
        ``final_lr`` (its first param group's learning rate times that multiplier), counts per action and
        anomaly, ``evidence`` (anomaly counts by what they were seen in: gradient, loss, update, loss scale),
        the first step of each anomaly, the worst spikes, and ``advice``: concrete configuration changes.
        """
        optimizers = {}
        for index, policy in sorted(self.policies.items()):
            counts = policy.counts
            evidence: dict[str, int] = {}
            for anomaly, kind in EVIDENCE.items():
                if counts.get(anomaly):
                    evidence[kind] = evidence.get(kind, 0) + counts[anomaly]
            base_lr = self._base_lrs.get(index)
            final_lr = None if base_lr is None else base_lr * policy.lr_scale
            optimizers[str(index)] = {
                "final_level": policy.level,
                "final_rung": RUNGS[policy.level],
                "lr_scale": policy.lr_scale,
                "final_lr": final_lr,
                "counts": counts,
                "evidence": evidence,
                "first_anomaly_steps": policy.first_anomaly_steps,
                "worst_spikes": policy.worst_spikes,
                "advice": guard_advice(policy, base_lr, self.config),
            }
        return {"stopped": self.stop_reason is not None, "stop_reason": self.stop_reason, "optimizers": optimizers}

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
        for index, optimizer in enumerate(trainer.optimizers):
            lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
            if isinstance(lr, (int, float)):
                self._base_lrs[index] = float(lr)
        self._write_summary(trainer)
        if self.console_summary and trainer.global_rank == 0 and self.policies:
            print_guard_summary(self.summary(), trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            print_fit_summary(trainer)  # the suite's one end-of-fit summary, printed by whichever callback is first
        for optimizer, _ in list(self._saved_lrs.values()):
            self._restore_lr(optimizer)
        for handle in self._step_hooks.values():
            handle.remove()
        self._step_hooks.clear()
        # a memory snapshot stays: a checkpoint saved after fit carries it, so a run resumed from it rolls back
        # alike; a disk snapshot is not carried, so its file is written out (or its failure noted) and removed
        if stage == "fit" and self._rollback.location == "disk":
            self._rollback.close()
        if stage == "fit":
            self._set_aside.close()
        if stage == "fit":
            self._step_buffers.clear()
            self._buffers_saved = False

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # an error or a preemption (Lightning turns SIGTERM into an exception in the loop): this run's disk
        # snapshot file is deleted now, since no later step of this process will use it. A memory one stays for
        # a checkpoint written after the error. A SIGKILL runs nothing: the next run names the file left over
        if self._rollback.location != "memory":  # on disk, or none (a write that failed or was cut short)
            self._rollback.close()
        self._set_aside.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "policies": {str(index): policy.state_dict() for index, policy in self.policies.items()},
            "stop_reason": self.stop_reason,
        }

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # a memory rollback snapshot travels with the checkpoint (tensors, so not in the JSON-like state_dict):
        # a resumed run rolls back to the same weights as the uninterrupted one would; a disk one is not
        # carried (its whole size in every checkpoint) and a resumed run takes a new one
        checkpoint[SNAPSHOT_CHECKPOINT_KEY] = self._rollback.state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(SNAPSHOT_CHECKPOINT_KEY)
        if not isinstance(saved, dict) or "version" not in saved:
            return
        try:  # the constructor's settings stay: a snapshot that does not fit them is dropped, not obeyed
            dropped = self._rollback.load_state_dict(saved)
        except ValueError as error:  # an older layout or a damaged one: a new snapshot is taken instead
            dropped = str(error)
        if dropped is not None:
            self._warn_once("checkpoint snapshot", f"ExplosionGuard: the checkpoint's rollback snapshot is not used "
                            f"({dropped}); a new one is taken at the next healthy step.")
        self._drop_unusable_snapshot(pl_module, None)  # the model is built; the optimizers come later

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version("ExplosionGuard", state_dict)
        owner = "ExplosionGuard checkpoint state"
        check_state(state_dict, {"policies": {}, "stop_reason": None}, owner)
        template = ExplosionPolicy(self.config).state_dict()
        for index, policy_state in state_dict["policies"].items():
            if not str(index).isdigit():
                raise ValueError(f"{owner}: `policies` keys must be optimizer indices, got {index!r}")
            if isinstance(policy_state, dict) and policy_state.get("version") in READABLE_VERSIONS:
                policy_state = upgraded_policy_state(policy_state, template)  # what an older layout lacks, fresh
            check_state(policy_state, template, owner, policy_rules(len(RUNGS)), POLICY_OPTIONAL, f"policies.{index}.")
        if state_dict["stop_reason"] is not None and not isinstance(state_dict["stop_reason"], str):
            raise ValueError(f"{owner}: `stop_reason` must be None or a str, got {state_dict['stop_reason']!r}")
        self.policies.clear()
        self._loaded_policies = {int(index): state for index, state in state_dict["policies"].items()}
        self.stop_reason = state_dict["stop_reason"]
        for index in list(self._loaded_policies):
            self.policy(index)


SKIP_LINES = 5
"""Skips said on the console per fit; later ones are counted in the summary and the event file."""


def _move_line(index: int, event: dict[str, Any]) -> str | None:
    """The one console line for an event that acts above clipping (skip, back-off, rollback, stop, a rung above
    ``clip``), ``None`` for clips and for the quiet steps of recovery."""
    check = event.get("rollback_check")
    if check is not None:
        scored = "nothing" if check["scored_loss"] is None else f"{check['scored_loss']:.4g}"
        verdict = {
            "objective": "the objective moved, not the weights: rollback, back-off and level undone",
            "no_better": "the snapshot is no better than the diverged weights: they come back, the back-off stays",
        }.get(check["verdict"], "the weights diverged: the rollback stands")
        where = "" if index == 0 else f" optimizer {index}:"
        return (
            f"ExplosionGuard step {event['step']}:{where} rollback check: the snapshot scored {scored} on "
            f"{check['batches']} new batches (its loss {check['snapshot_loss']:.4g}, diverged "
            f"{check['diverged_loss']:.4g}): {verdict}"
        )
    actions = [a for a in event["actions"] if a != "clip"]
    backed_off = event["anomaly"] is not None and event["lr_scale"] < 1.0 and (
        event["level"] >= RUNGS.index("lr_backoff") or event["anomaly"] == "divergence"
    )
    climbed = event["level"] > event["previous_level"] and event["level"] > RUNGS.index("tight_clip")
    if not (actions or climbed or backed_off):
        return None
    what = "+".join(actions) if actions else f"level {event['rung']}"
    evidence = f"{event['anomaly']} ({event['evidence']} evidence)" if event["anomaly"] else "healthy"
    where = "" if index == 0 else f" optimizer {index}:"
    lr = f", lr x {event['lr_scale']:.3g}" if event["lr_scale"] != 1.0 else ""
    tail = " (further skips are counted in the summary)" if event["actions"] == ["skip"] else ""
    return f"ExplosionGuard step {event['step']}:{where} {what} on {evidence}, level {event['rung']}{lr}{tail}"


def _clear_found_inf(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Tell the GradScaler this step did not overflow (its gradients are dropped by the guard instead).

    A rank-local fault may have set ``found_inf`` on one rank only; left alone, that rank would halve its loss
    scale while the others keep theirs, and every later step would be scaled differently per rank.
    """
    state = scaler._per_optimizer_states.get(id(optimizer), {})
    for found_inf in state.get("found_inf_per_device", {}).values():
        found_inf.zero_()
