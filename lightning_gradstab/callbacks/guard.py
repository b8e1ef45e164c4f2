"""ExplosionGuard: catch a gradient explosion before the update lands, escalate, recover, and say what happened.

A thin Lightning adapter over :class:`~lightning_gradstab.guard.ladder.ExplosionPolicy`. Per optimizer step it reads
the shared gradient statistics, reduces the few numbers a decision needs across ranks in one collective, reads
them on the host once, and carries out the policy's decision (clip, skip, scale the learning rate, roll back,
stop) identically on every rank. The parts live beside it: the arguments (``_guard_config``), the step's
measurement across ranks (``_guard_step``), the snapshots (``_guard_rollback``), the learning-rate scale
(``_guard_lr``), the scalars, console lines and files (``_guard_records``) and the end-of-fit summary
(``_guard_summary``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_gradstab.arguments import check_flag, check_interval, check_positive
from lightning_gradstab.callbacks._guard_config import guard_config
from lightning_gradstab.callbacks._guard_lr import StepLrScale, warn_without_lr
from lightning_gradstab.callbacks._guard_records import EVENTS_FILENAME, SUMMARY_FILENAME, GuardRecords, stop_reason
from lightning_gradstab.callbacks._guard_rollback import SNAPSHOT_DIRNAME, GuardSnapshots
from lightning_gradstab.callbacks._guard_step import StepLoss, StepReading, clear_found_inf, observe
from lightning_gradstab.callbacks._guard_summary import guard_summary, print_guard_summary
from lightning_gradstab.callbacks._guard_update import GuardUpdateCeiling
from lightning_gradstab.callbacks._guard_writes import OutsideWrites
from lightning_gradstab.callbacks._optimizers import sgd_step_size
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
from lightning_gradstab.distributed import refuse_unsupported_strategy, strategy_kind
from lightning_gradstab.guard.config import RUNGS, PolicyConfig
from lightning_gradstab.guard.decision import Decision
from lightning_gradstab.guard.detect import Observation
from lightning_gradstab.guard.ladder import ExplosionPolicy
from lightning_gradstab.guard.policy_state import READABLE_VERSIONS, upgraded_policy_state
from lightning_gradstab.guard.snapshot import RollbackSnapshot
from lightning_gradstab.guard.summary import GuardSummary
from lightning_gradstab.logits.qk_clip import DEFAULT_CAP, AttentionLogitCap
from lightning_gradstab.state_checks import POLICY_OPTIONAL, check_state, policy_rules
from lightning_gradstab.tensorboard import GUARD_CHARTS
from lightning_gradstab.update_ceiling import DEFAULT_MAX_RELATIVE_UPDATE

__all__ = [
    "ATTENTION_LOGIT_EVERY",
    "EVENTS_FILENAME",
    "SNAPSHOT_CHECKPOINT_KEY",
    "SNAPSHOT_DIRNAME",
    "SUMMARY_FILENAME",
    "WEIGHT_NORM_EVERY",
    "ExplosionGuard",
    "GradientExplosionError",
]

WEIGHT_NORM_EVERY = 10
"""Optimizer steps between measurements of the weight norm (plain SGD only; weights change slowly)."""

ATTENTION_LOGIT_EVERY = 10
"""Optimizer steps between measurements of the attention logits while no head is above half the cap (every step
while one is: at a learning rate high enough to grow them, the logits of a head just below the cap can double in
10 steps, and a 1-layer char GPT at lr 0.3 whose head was measured at 92 ended 10 unmeasured steps later at 218):
logit growth is a trend over hundreds of steps, and a measurement costs a few small matrix products per attention
layer."""

SNAPSHOT_CHECKPOINT_KEY = "gradstab_guard_snapshot"
"""Where :meth:`ExplosionGuard.on_save_checkpoint` keeps the rollback snapshot in a Lightning checkpoint."""


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
    and its defaults are described in :mod:`lightning_gradstab.guard` and ``docs/guard.md``.

    Besides the gradient norm it watches the training loss (captured in ``on_before_backward``, unscaled under
    fp16, summed over accumulated micro-batches, kept on the device) and, for plain SGD, the size of the step
    relative to the weights, so a run that is unstable from its first step, or a bad batch under Adam, is
    caught although the run's own gradient history looks normal.

    Weights written between optimizer steps by anything but the optimizer (a layer reset, pruning's rewind, a
    ``load_state_dict``) are the user's: the guard sees them through PyTorch's version counters and starts afresh
    from them, its snapshot dropped, so no rollback undoes them (see :mod:`lightning_gradstab.callbacks._guard_writes`).

    Every decision comes from numbers all-reduced across ranks (max norm, max loss, any rank's and every
    rank's NaN, min loss scale) in a single collective, read on the host in a single sync per optimizer step,
    so all ranks clip, skip, roll back and stop on the same step. ``Trainer(gradient_clip_val=...)`` still
    applies after the guard: the tighter of the two clips wins.

    Logged (rank 0, ``opt{i}/`` inserted for optimizers after the first) every ``log_every_n_steps`` and on
    every intervention: ``gradstab/level``, ``clip_threshold``, ``clipped``, ``skipped``, ``lr_scale``,
    ``rollbacks``, ``zscore``, ``amp_overflow``; and on every step the attention logits are measured (QK-clip),
    ``gradstab/attention_logit_max``. Events go to ``gradstab_guard_events.jsonl`` and the outcome to
    ``gradstab_guard_summary.json`` in the log directory; a table is printed at the end of ``fit``.

    The two knobs most runs set are named; every other threshold and budget of the ladder (``zscore_threshold``,
    ``growth_factor``, ``loss_rise_tolerance``, ``budgets``, ``snapshot_every``, ...) is a field of
    :class:`~lightning_gradstab.PolicyConfig`, passed as ``config``, where each option's default and valid range
    are documented once. Passing those fields as keyword arguments of the guard still works but is deprecated.

    Args:
        max_rung: highest rung: ``"observe"``, ``"clip"``, ``"tight_clip"``, ``"skip"``, ``"lr_backoff"``,
            ``"rollback"`` or ``"stop"`` (default).
        max_norm: an absolute ceiling on the gradient norm (ZClip's ``max_grad_norm``), > 0. ``"auto"`` (the
            default): 1.0 for optimizers whose step ignores the gradient's scale (Adam, AdamW, RMSprop, Adagrad
            and any optimizer with ``betas``, see :data:`~lightning_gradstab.guard.config.SCALE_INVARIANT_MAX_NORM`),
            none for SGD and the others, where a ceiling would lower the learning rate; ``None``: no ceiling.
        config: every other option of the ladder, a :class:`~lightning_gradstab.PolicyConfig` or a mapping of
            its fields (a YAML node: ``config: {growth_factor: 3.0}``). ``max_rung`` and ``max_norm`` left at
            their defaults take the config's values; set both ways to different values they raise ``ValueError``.
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
        attention_logit_cap: QK-clip's cap (Kimi K2's ``tau``, see :mod:`lightning_gradstab.logits.qk_clip`): an
            attention head of a layer without qk-norm whose largest logit ``q . k / sqrt(d)`` exceeds it has its
            query and key rows shrunk so that it is back at the cap (measured every
            :data:`ATTENTION_LOGIT_EVERY` steps, every step while a head is above half the cap). A number > 0
            (default 100) or ``None`` (off). Like clipping it acts from a measurement alone: a logit of 100 is far
            beyond any attention pattern's needs, so a healthy head never reaches it. Needs ``max_rung`` at ``"clip"``
            or above; off under FSDP and ``ModelParallelStrategy`` (a head's rows are not whole on every rank).
        max_relative_update: the relative-update ceiling (see :mod:`lightning_gradstab.update_ceiling`): for
            Adam-family optimizers, a weight matrix whose step is more than this share of its scale (its RMS, at
            least ``1/sqrt(fan_in)``) has the step shrunk to it right after the optimizer steps. Adam moves every
            coordinate by about the learning rate whatever the gradient, so clipping cannot shrink its step. A
            number > 0 (default 0.1, ten times Adafactor's relative step) or ``None`` (off). Measured on the
            first step, every step while steps come within half of it and after a learning-rate rise, otherwise
            checked every 100 steps on every 8th row; needs ``max_rung`` at ``"clip"`` or above; off under FSDP1.
        raise_on_stop: raise :class:`GradientExplosionError` instead of stopping gracefully.
        log_every_n_steps: logging interval in optimizer steps (default: the trainer's).
        console_summary: print the table of actions at the end of ``fit``.

    Example::

        from lightning_gradstab import ExplosionGuard, GradNormMonitor, PolicyConfig

        trainer = pl.Trainer(callbacks=[GradNormMonitor(), ExplosionGuard()])
        clip_only = ExplosionGuard(max_rung="clip")
        tuned = ExplosionGuard(max_norm=None, config=PolicyConfig(growth_factor=3.0, loss_rise_tolerance=None))
    """

    def __init__(
        self,
        max_rung: str = PolicyConfig.max_rung,
        *,
        max_norm: float | Literal["auto"] | None = PolicyConfig.max_norm,
        config: PolicyConfig | Mapping[str, Any] | None = None,
        snapshot_keep: Literal["weights", "weights+optimizer"] = "weights+optimizer",
        snapshot_location: Literal["memory", "disk"] = "memory",
        snapshot_max_bytes: int | Literal["auto"] | None = "auto",
        snapshot_dir: str | os.PathLike[str] | None = None,
        attention_logit_cap: float | None = DEFAULT_CAP,
        max_relative_update: float | None = DEFAULT_MAX_RELATIVE_UPDATE,
        raise_on_stop: bool = False,
        log_every_n_steps: int | None = None,
        console_summary: bool = True,
        **deprecated: Any,
    ) -> None:
        self.config = guard_config(config, max_rung, max_norm, deprecated)
        self._snapshots = GuardSnapshots(
            snapshot_keep, snapshot_location, snapshot_max_bytes, snapshot_dir, max_rung=self.config.max_rung
        )
        self.attention_logit_cap = (
            None if attention_logit_cap is None else check_positive(attention_logit_cap, "attention_logit_cap")
        )
        self.max_relative_update = (
            None if max_relative_update is None else check_positive(max_relative_update, "max_relative_update")
        )
        self.raise_on_stop = check_flag(raise_on_stop, "raise_on_stop")
        self.log_every_n_steps = check_interval(log_every_n_steps, "log_every_n_steps")
        self.console_summary = check_flag(console_summary, "console_summary")
        self.policies: dict[int, ExplosionPolicy] = {}
        self.stop_reason: str | None = None
        self._loaded_policies: dict[int, dict[str, Any]] = {}
        self._lr_scale = StepLrScale()
        self._records = GuardRecords()
        self._step_loss = StepLoss()  # this optimizer step's loss so far, on the device
        self._weight_norms: dict[int, float] = {}  # the last measured weight norm per optimizer (plain SGD)
        self._base_lrs: dict[int, float] = {}  # each optimizer's first param group lr, read at the end of fit
        self._warned_once: set[str] = set()
        self._competing_losses: str | None = None  # why the loss rules are off for every optimizer of this fit
        self._logit_cap: AttentionLogitCap | None = None  # QK-clip on this fit's model (None: off or no layer)
        self._logit_wait = 0  # optimizer steps until the attention logits are measured again
        self._logit_caps: dict[str, dict[str, float]] = {}  # layer -> steps rescaled and the largest logit seen
        self._update_ceiling: GuardUpdateCeiling | None = None  # the relative-update ceiling of this fit (None: off)
        self._outside_writes = OutsideWrites()  # writes to the weights between optimizer steps, not the optimizer's

    def policy(self, index: int = 0) -> ExplosionPolicy:
        """The policy (statistics, level, event log) of optimizer ``index``, created on first use."""
        if index not in self.policies:
            policy = ExplosionPolicy(self.config)
            if index in self._loaded_policies:
                policy.load_state_dict(self._loaded_policies.pop(index))
            self.policies[index] = policy
            self._records.seen(index, policy)
        return self.policies[index]

    @property
    def snapshot_step(self) -> int | None:
        """The step the current rollback snapshot was taken at (``None``: there is none)."""
        return self._snapshots.rollback.step if self._snapshots.rollback.available else None

    @property
    def rollback_snapshot(self) -> RollbackSnapshot:
        """The store of the rollback snapshot (where it lives, its size in bytes, its step)."""
        return self._snapshots.rollback

    @property
    def level(self) -> int:
        """Current ladder level of the first optimizer's policy."""
        return self.policy(0).level

    def guard_events(self) -> list[dict[str, Any]]:
        """Every optimizer's kept events, oldest first within each, with its ``optimizer`` index (copies).

        The keys are those of :attr:`lightning_gradstab.guard.ladder.ExplosionPolicy.events`; this is the read-only
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
        self._records.forget()
        self._weight_norms.clear()
        self._base_lrs.clear()
        self._step_loss.take()
        self._snapshots.new_run()
        self._drop_logit_cap()
        self._logit_caps.clear()
        self._drop_update_ceiling()
        self._outside_writes.close()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_unsupported_strategy(trainer.strategy, "ExplosionGuard")  # DeepSpeed: no readable gradients
        mark_fit_start(trainer)  # the end-of-fit summary lists only the report files written from here on
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank calls it
        self._records.start_fit(log_dir)
        self._snapshots.start_fit(log_dir, trainer.num_devices)  # ranks on this host share the "auto" bound
        add_tensorboard_layout(trainer, pl_module)  # only the charts this run's callbacks fill

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a checkpoint's snapshot, checked against the optimizers too
        self._snapshots.drop_unusable(pl_module, trainer.optimizers, self._warn_once)
        self._competing_losses = None
        self._records.start_training()
        if not pl_module.automatic_optimization and len(trainer.optimizers) > 1:
            # several optimizers stepped by hand are almost always adversarial (a GAN) or otherwise competing
            # objectives: each loss rises when the other model improves, so neither may be judged as one that falls
            self._competing_losses = (
                f"{len(trainer.optimizers)} optimizers under manual optimization: competing losses (e.g. a GAN)"
            )
        if not self._snapshots.rollback.available:  # resumed from a checkpoint without a snapshot: take one first
            self._forget_snapshots()
        if self.config.allows("lr_backoff"):
            warn_without_lr(trainer.optimizers)
        self._attach_logit_cap(trainer, pl_module)
        self._attach_update_ceiling(trainer)
        self._outside_writes.watch(trainer.optimizers)

    def _attach_logit_cap(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """QK-clip's hooks on the attention layers without qk-norm (none: nothing is hooked)."""
        self._drop_logit_cap()
        if self.attention_logit_cap is None or not self.config.allows("clip"):
            return
        kind = strategy_kind(trainer.strategy)
        if kind != "replicated":
            # sharded weights: which rows of a head a rank holds differs by rank (FSDP1 flattens them), and the
            # per-head vector every rank carries into the reduction must have one length everywhere
            self._warn_once("qk-clip sharded", (
                f"ExplosionGuard: attention logits are not capped under a sharded strategy ({kind}); QK-clip needs "
                "each head's query and key rows whole on every rank (said once)."))
            return
        cap = AttentionLogitCap(pl_module, self.attention_logit_cap)
        if cap.skipped:
            self._warn_once("qk-clip skipped", "ExplosionGuard: attention logits are not capped in " + "; ".join(
                f"{name} ({why})" for name, why in cap.skipped.items()) + " (said once).")
        if cap.heads:
            self._logit_cap = cap
        else:
            cap.remove()

    def _drop_logit_cap(self) -> None:
        if self._logit_cap is not None:
            self._logit_cap.remove()
        self._logit_cap, self._logit_wait = None, 0

    def _attach_update_ceiling(self, trainer: pl.Trainer) -> None:
        """The relative-update ceiling for this fit's Adam-family optimizers (off for FSDP1's flat shards)."""
        self._drop_update_ceiling()
        if self.max_relative_update is None or not self.config.allows("clip"):
            return
        if not any(GuardUpdateCeiling.applies_to(getattr(o, "_optimizer", o)) for o in trainer.optimizers):
            return
        kind = strategy_kind(trainer.strategy)
        if kind == "fsdp":
            # a flat parameter packs many weight tensors: its RMS is not any one tensor's
            self._warn_once("update ceiling fsdp1", (
                "ExplosionGuard: the relative-update ceiling is off under FSDPStrategy (FSDP1 flattens the weight "
                "tensors); ModelParallelStrategy (FSDP2) keeps them whole (said once)."))
            return
        self._update_ceiling = GuardUpdateCeiling(self.max_relative_update, after_write=self._outside_writes.resync)

    def _drop_update_ceiling(self) -> None:
        if self._update_ceiling is not None:
            self._update_ceiling.close()
        self._update_ceiling = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._snapshots.save_buffers(pl_module)  # at the first forward of an optimizer step
        if self._logit_cap is not None and self._logit_wait == 0 and not self._logit_cap.armed:
            self._logit_cap.arm()  # the same step on every rank: the schedule follows reduced values only

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # the loss of every micro-batch (and every manual_backward) of the coming optimizer step, on the device
        if not self._step_loss.add(loss, getattr(trainer.precision_plugin, "scaler", None)):
            self._warn_once(
                "vector loss",
                f"ExplosionGuard: a backward of a loss of shape {tuple(loss.shape)} (manual_backward with "
                "`gradient=`): the guard judges such steps by their gradients only, not by their loss (said once).",
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        raw = getattr(optimizer, "_optimizer", optimizer)
        self._lr_scale.restore(raw)  # a scaled step the optimizer never ran (e.g. skipped by a GradScaler)
        weights_changed = self._outside_writes.changed()  # before the guard's own writes of this step
        index = optimizer_index(trainer, optimizer)
        policy = self.policy(index)
        if self._competing_losses is not None:
            policy.disable_loss_rules(self._competing_losses)
        stats = gradient_stats(trainer, pl_module, raw)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        step_size = sgd_step_size(raw) if self.config.max_update_ratio is not None else None
        weight_norm: torch.Tensor | float = self._weight_norms.get(index, 0.0)
        if step_size is not None and (policy.steps % WEIGHT_NORM_EVERY == 0 or index not in self._weight_norms):
            weight_norm = stats.weight_norms().square().sum().sqrt()
        cap = self._logit_cap
        # armed on every rank alike, so every rank carries the vector in the collective
        logits = cap.take(stats.total_norm.device) if cap is not None and cap.armed else None
        ceiling = self._update_ceiling
        if ceiling is not None and not GuardUpdateCeiling.applies_to(raw):
            ceiling = None  # plain SGD beside an Adam (a GAN's two optimizers, say): its step is the gradient's
        # one optimizer step consumes the losses since the last
        reading = observe(
            stats, raw, self._step_loss.take(), weight_norm, self._snapshots.ready, scaler,
            distributed=trainer.world_size > 1, step_size=step_size, competing=self._competing_losses is not None,
            attention_logits=logits,
            update_outcome=ceiling.outcome(index) if ceiling is not None else (0.0, 0.0),
            weights_changed=weights_changed,
        )
        observation, snapshot_everywhere = reading.observation, reading.snapshot_everywhere
        if reading.weights_changed:  # on some rank: every rank starts afresh alike
            self._weight_norms.clear()  # the new weights' norm is measured on the next step
            if self._weights_changed(trainer):
                # the statistics restart from the new weights: the old weights' cached norm is no evidence about them
                observation = dataclasses.replace(observation, weight_norm=None)
        wrote = False  # whether the guard itself writes the weights in this hook (QK-clip, a rollback)
        if cap is not None:
            wrote = self._cap_attention_logits(
                trainer, cap, policy, reading.attention_logits if logits is not None else None
            )
        if ceiling is not None:
            self._read_update_ceiling(trainer, ceiling, index, policy, reading, observation.lr)
        if observation.weight_norm is not None:
            self._weight_norms[index] = observation.weight_norm
        decision = policy.step(observation)
        if observation.rank_local and scaler is not None:
            clear_found_inf(scaler, raw)  # not an overflow: no rank may lower its scale alone
        rolled_back = self._act(trainer, pl_module, raw, policy, decision, observation, scaler, snapshot_everywhere)
        if rolled_back:  # other weights now: the next step measures their norm instead of using this step's
            self._weight_norms.pop(index, None)
        wrote = rolled_back or wrote
        if ceiling is not None:  # after the clip and the LR scale: the copy is of the weights this step moves
            if decision.skip:
                ceiling.skip(index)
            else:
                ceiling.begin(index, raw)
        self._records.report(trainer, index, policy, decision, self.log_every_n_steps)
        if wrote:  # the guard's own writes are not from outside (a step that follows takes them in too)
            self._outside_writes.resync()

    def _weights_changed(self, trainer: pl.Trainer) -> bool:
        """The weights were written since the last optimizer step by something other than the optimizer: every
        policy starts afresh from them (see :meth:`ExplosionPolicy.weights_changed`). Whether one did (a write
        that recurs within the warm-up restarts them once)."""
        restarted = [policy.weights_changed() for policy in list(self.policies.values())]
        if any(restarted):
            self._warn_once("weights changed", (
                f"ExplosionGuard: the weights were changed outside the optimizer before step {trainer.global_step} "
                "(a reset, pruning, a rewind or a load); the guard's statistics start afresh from the new weights "
                "and its rollback snapshot is dropped, so no rollback undoes the change (said once)."))
        return any(restarted)

    def _act(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        policy: ExplosionPolicy,
        decision: Decision,
        observation: Observation,
        scaler: Any = None,
        snapshot_everywhere: bool = True,
    ) -> bool:
        """Carry out ``decision``; whether the weights were written (a rollback, or its check undone)."""
        rolled_back = self._snapshots.act(  # the decision's snapshot, rollback and rollback check, every rank alike
            trainer, pl_module, decision, scaler, snapshot_everywhere,
            abandon_check=policy.abandon_rollback_check,
            forget_snapshots=self._forget_snapshots,
        )
        if decision.reset_loss_scale and scaler is not None and scaler._scale is not None:
            scaler._scale.fill_(scaler._init_scale)  # a device write on every rank alike: no sync
            scaler._growth_tracker.zero_()
        if decision.skip:
            for group in optimizer.param_groups:  # the optimizer skips None grads: no weight and no state change
                for parameter in group["params"]:
                    parameter.grad = None
        elif decision.clip_coefficient < 1.0:
            # one foreach call: it groups the gradients by device and dtype itself (one fused kernel per group
            # on an accelerator), reads nothing back, and is bound by one read and one write of every gradient
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch._foreach_mul_(grads, decision.clip_coefficient)
        self._snapshots.end_step(decision.skip, rolled_back)  # nor a buffer change from a skipped step's forward
        if decision.lr_scale != 1.0 and not decision.skip and not observation.nonfinite:
            self._lr_scale.apply(optimizer, decision.lr_scale)
        if decision.stop:
            self._stop(trainer, decision)
        return rolled_back

    def _cap_attention_logits(
        self, trainer: pl.Trainer, cap: AttentionLogitCap, policy: ExplosionPolicy, logits: list[float] | None
    ) -> bool:
        """QK-clip on a measured step (the logits reduced across ranks: every rank rescales alike), and the
        schedule of the next measurement: the next step while a head is above half the cap, else in
        ATTENTION_LOGIT_EVERY.
        The largest measured logit is logged as ``gradstab/attention_logit_max`` (a host value already). Whether
        it rescaled a head (a write into the weights)."""
        if logits is None:
            self._logit_wait = max(self._logit_wait - 1, 0)
            return False
        if logits:
            log_metrics(trainer, {"gradstab/attention_logit_max": max(logits)}, logging_step(trainer))
        capped = cap.apply(logits)
        for layer, logit in capped.items():  # one count per layer rescaled
            policy.count_action("attention_logit_cap")
            record = self._logit_caps.setdefault(layer, {"capped_steps": 0, "max_logit": 0.0})
            record["capped_steps"] += 1
            record["max_logit"] = max(record["max_logit"], logit)
        if capped:
            largest = max(capped.values())
            self._warn_once("qk-clip", (
                f"ExplosionGuard: attention logits reached {largest:.3g} (cap {cap.cap:g}) in "
                f"{', '.join(sorted(capped))}; their query/key heads are rescaled to the cap (QK-clip) whenever "
                "they pass it. The architectural fix is qk-layernorm (Wortsman et al. 2023) (said once)."))
        # the next step too while a head is within a factor 2 of the cap: at a high LR the logits can double in
        # ATTENTION_LOGIT_EVERY steps (the relative-update ceiling is measured on the same rule)
        near = bool(logits) and max(logits) > 0.5 * cap.cap
        self._logit_wait = 0 if capped or near else ATTENTION_LOGIT_EVERY - 1
        return bool(capped)

    def _read_update_ceiling(
        self, trainer: pl.Trainer, ceiling: GuardUpdateCeiling, index: int, policy: ExplosionPolicy,
        reading: StepReading, lr: float | None,
    ) -> None:
        """The previous step's ceiling outcome, reduced with this step's numbers: counted, logged when measured,
        said once; then the plan for this step (every rank alike: the values are reduced)."""
        measured = ceiling.measuring(index)
        bounded = ceiling.read(index, reading.update_bounded, reading.update_ratio_max, lr)
        suffix = f"opt{index}/" if index else ""
        if measured:
            log_metrics(trainer, {f"gradstab/{suffix}relative_update_max": reading.update_ratio_max},
                        logging_step(trainer))
        if bounded:
            policy.count_action("relative_update")
            self._warn_once("relative update", (
                f"ExplosionGuard: an optimizer step moved {bounded} weight tensor(s) by "
                f"{reading.update_ratio_max:.3g} of their RMS (ceiling {self.max_relative_update:g}); such steps "
                "are shrunk to the ceiling whenever they pass it. A lower learning rate or a longer warm-up "
                "removes them (said once)."))

    def attention_logit_caps(self) -> dict[str, dict[str, float]]:
        """Per attention layer QK-clip rescaled in this fit: ``{"capped_steps": n, "max_logit": x}``, the largest
        logit it measured before a rescale (a copy; what ``ArchitectureAdvisor`` names growth from).

        Example::

            guard.attention_logit_caps()  # {} before any fit, and for a model whose logits stay below the cap
        """
        return {layer: dict(record) for layer, record in self._logit_caps.items()}

    def _stop(self, trainer: pl.Trainer, decision: Decision) -> None:
        self.stop_reason = stop_reason(decision)
        trainer.should_stop = True
        self._records.write_summary(trainer, self.summary())
        if self.raise_on_stop:
            raise GradientExplosionError(
                f"ExplosionGuard stopped training at {self.stop_reason}; summary: {self._records.summary_path}"
            )

    def _forget_snapshots(self) -> None:
        """Every policy takes a new snapshot at its next healthy step (the current one is gone or unusable)."""
        for policy in self.policies.values():
            policy.forget_snapshot()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned_once:
            self._warned_once.add(key)
            rank_zero_warn(message)

    @override
    def summary_contribution(self) -> SummaryContribution:
        # a guard built with console_summary=False prints nothing at the end of fit, in its table or there
        if not self.console_summary:
            return SummaryContribution()
        summary = self._summary()
        return SummaryContribution(guard_summaries=(summary,) if summary.optimizers else ())

    @override
    def tensorboard_charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        return list(GUARD_CHARTS)

    def summary(self) -> dict[str, Any]:
        """What the guard did, per optimizer, as plain data (also written to ``gradstab_guard_summary.json``).

        Per optimizer: final level and rung, ``lr_scale`` (the multiplier the run ended at after back-offs) and
        ``final_lr`` (its first param group's learning rate times that multiplier), counts per action and
        anomaly, ``evidence`` (anomaly counts by what they were seen in: gradient, loss, update, loss scale),
        the first step of each anomaly, the worst spikes, and ``advice``: concrete configuration changes. It is
        :meth:`GuardSummary.to_mapping <lightning_gradstab.guard.summary.GuardSummary.to_mapping>` of the typed
        record the end-of-fit table and the suite's summary read.
        """
        return self._summary().to_mapping()

    def _summary(self) -> GuardSummary:
        return guard_summary(self.policies, self._base_lrs, self.config, self.stop_reason)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for index, optimizer in enumerate(trainer.optimizers):
            lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
            if isinstance(lr, (int, float)):
                self._base_lrs[index] = float(lr)
        summary = self._summary()
        self._records.write_summary(trainer, summary.to_mapping())
        if self.console_summary and trainer.global_rank == 0 and self.policies:
            print_guard_summary(summary, trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            print_fit_summary(trainer)  # the suite's one end-of-fit summary, printed by whichever callback is first
        self._lr_scale.close()
        if stage == "fit":
            self._snapshots.end_fit()
            self._drop_logit_cap()  # the model runs on without the guard's hooks
            self._drop_update_ceiling()
            self._outside_writes.close()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # an error or a preemption (Lightning turns SIGTERM into an exception in the loop); a SIGKILL runs
        # nothing: the next run names the file left over
        self._snapshots.on_exception()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "policies": {str(index): policy.state_dict() for index, policy in self.policies.items()},
            "stop_reason": self.stop_reason,
            "attention_logit_caps": self.attention_logit_caps(),
        }

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # a memory rollback snapshot travels with the checkpoint (tensors, so not in the JSON-like state_dict):
        # a resumed run rolls back to the same weights as the uninterrupted one would; a disk one is not
        # carried (its whole size in every checkpoint) and a resumed run takes a new one
        checkpoint[SNAPSHOT_CHECKPOINT_KEY] = self._snapshots.rollback.state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(SNAPSHOT_CHECKPOINT_KEY)
        if not isinstance(saved, dict) or "version" not in saved:
            return
        self._snapshots.load(saved, pl_module, self._warn_once)

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
        caps = _checked_logit_caps(state_dict.get("attention_logit_caps", {}), owner)  # absent before guard v3.4
        self.policies.clear()
        self._loaded_policies = {int(index): state for index, state in state_dict["policies"].items()}
        self.stop_reason = state_dict["stop_reason"]
        self._logit_caps = caps
        for index in list(self._loaded_policies):
            self.policy(index)


def _checked_logit_caps(caps: Any, owner: str) -> dict[str, dict[str, float]]:
    """A checkpoint's record of what QK-clip rescaled, checked: ``{layer: {"capped_steps": n >= 0, "max_logit":
    a finite x >= 0}}``."""
    if not isinstance(caps, Mapping):
        raise ValueError(f"{owner}: `attention_logit_caps` must be a dict, got {caps!r}")
    checked: dict[str, dict[str, float]] = {}
    for layer, record in caps.items():
        steps = record.get("capped_steps") if isinstance(record, Mapping) else None
        logit = record.get("max_logit") if isinstance(record, Mapping) else None
        if (
            not isinstance(layer, str)
            or not isinstance(steps, int) or isinstance(steps, bool) or steps < 0
            or not isinstance(logit, (int, float)) or isinstance(logit, bool) or not math.isfinite(logit) or logit < 0
        ):
            raise ValueError(
                f"{owner}: `attention_logit_caps.{layer}` must be {{'capped_steps': int >= 0, 'max_logit': "
                f"finite float >= 0}}, got {record!r}"
            )
        checked[layer] = {"capped_steps": steps, "max_logit": float(logit)}
    return checked
