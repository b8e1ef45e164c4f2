"""``ArchitectureAdvisor``: watch the first steps of training and name the architectural cause of trouble."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradstab.arguments import check_flag, check_int, check_open_interval
from lightning_gradstab.callbacks._first_batch import first_batch_measurement
from lightning_gradstab.callbacks._reporting import (
    ForwardFn,
    ReportingCallback,
    publish_report,
)
from lightning_gradstab.callbacks._shared import (
    STATE_VERSION,
    check_state_version,
    forget_trainer,
    gradient_stats,
    optimizer_index,
    parameter_layout,
)
from lightning_gradstab.diagnosis import ModelGraph
from lightning_gradstab.diagnosis.optimizer_rules import adaptive_optimizer_findings
from lightning_gradstab.diagnosis.training_rules import gradient_findings, guard_findings, loss_findings
from lightning_gradstab.diagnosis.weight_decay_rules import parameter_weight_decay, weight_decay_findings
from lightning_gradstab.guard_events import collect_guard_events
from lightning_gradstab.logits.rules import capped_logit_findings
from lightning_gradstab.logits.watch import LogitWatch
from lightning_gradstab.report import Finding, Report
from lightning_gradstab.stats import GradientStats

ADVISOR_FILENAME = "gradstab_advisor.json"


class ArchitectureAdvisor(ReportingCallback):
    """Read the first ``observe_steps`` optimizer steps and recommend architectural fixes.

    It never recomputes gradient norms: per-layer norms come from the suite's shared statistics
    (``gradient_stats`` in ``on_before_optimizer_step``) and stay on the device until the window ends, when
    one host transfer feeds the rules. Its first look at the first batch is ``InitAudit``'s measurement (the
    same probe, the same findings as ``diagnose(model, batch)``), kept as ``first_look``; its graph feeds the
    training-time rules. Findings:

    - ``arch.residual`` (error) when a plain chain of >= 20 layers trains with a stalling loss (relative
      improvement below ``stall_improvement`` from the first to the last tenth of the window): the
      degradation problem of plain nets (He et al. 2016), which shows in the loss, not in gradient norms.
    - ``signal.vanishing``/``signal.exploding`` when the median per-element weight gradient of the first layer
      on the main path is 100x below/above the last layer of the same kind (output layers, query/key
      projections, gates and residual-branch layers are no reference), then ``arch.normalization`` and
      ``arch.activation`` for the structural cause.
    - ``signal.exploding`` when an ``ExplosionGuard`` in ``trainer.callbacks`` met an anomaly or escalated
      during the window (read through the :class:`~lightning_gradstab.guard_events.GuardEventSource`
      protocol; optional), plus ``arch.recurrent`` for vanilla RNNs.

    - ``attention.logit_growth`` / ``output.logit_divergence`` (Wortsman et al. 2023) from a
      :class:`~lightning_gradstab.logits.watch.LogitWatch` that measures, every ``logit_every_n_steps`` steps of
      the window, the max attention logit ``q . k / sqrt(d)`` per attention layer and the output layer's mean
      log-partition (on rank 0's batch); the fixes named are qk-layernorm and z-loss 1e-4. Layers that already
      have a qk-norm are never named. Attention layers are found by their shape (see the module docstring of
      :mod:`lightning_gradstab.logits.sites`); ``attention_modules`` and ``output_module`` name others.

    - ``optimizer.adaptive`` (warning) under plain SGD when the per-layer medians of ``||g|| / ||w||`` (weight
      matrices and kernels) span >= 100x and the loss stalls: one learning rate cannot move every layer; the fix
      named is Adam/AdamW or RMSProp (Kingma & Ba 2015), or LARS-style per-layer rates (You et al. 2017). Not
      when the window's ``signal.vanishing``/``signal.exploding`` explains the spread (the model's fix comes first).
    - ``optimizer.weight_decay`` (warning) when the weight matrices whose param group has ``weight_decay == 0``
      grew >= 2x over the window (robust log-norm trend), their gradient norm did not fall, and the loss stalls;
      the fix named is decoupled weight decay (Loshchilov & Hutter 2019) or SGD's, or a lower learning rate.

    Both read the per-parameter gradient norms and weight norms of the suite's shared statistics (the weight
    norms are one fused ``_foreach_norm`` over the weights, cached per step, so shared with a guard or monitor
    that measures them on the same step) every ``optimizer_every_n_steps`` optimizer steps of the window; the
    samples stay on the device (2 floats per weight matrix per sample) until the window ends, then one host
    transfer per optimizer. Flattened parameters (FSDP1 without ``use_orig_params``) hold no matrices: no advice.

    The rules are the pure functions of :mod:`lightning_gradstab.diagnosis.training_rules`,
    :mod:`lightning_gradstab.diagnosis.optimizer_rules`, :mod:`lightning_gradstab.diagnosis.weight_decay_rules`
    and :mod:`lightning_gradstab.logits.rules`.

    Global rank 0 publishes the report like ``InitAudit`` (console, TensorBoard ``gradstab/findings``,
    ``<log_dir>/gradstab_advisor.json``). It changes nothing in training.

    Args:
        observe_steps: optimizer steps to watch before reporting (reported at the end of training if shorter).
        stall_improvement: relative loss decrease below which the loss counts as stalled.
        forward_fn: ``forward_fn(pl_module, batch) -> output`` used for the graph trace instead of
            ``training_step`` (needed under manual optimization).
        watch_logits: measure attention and output logits (hooks, only on the measured steps).
        logit_every_n_steps: measure on every this many optimizer steps of the window.
        attention_modules: attention module names to watch (or a mapping to their ``(query, key)`` Linear
            children); ``None`` finds them.
        output_module: the name of the layer producing the logits; ``None`` finds it.
        advise_optimizer: gather the optimizer evidence (``optimizer.adaptive``, ``optimizer.weight_decay``).
        optimizer_every_n_steps: sample the weight and gradient norms of the weight matrices on every this many
            optimizer steps of the window.

    Example::

        trainer = pl.Trainer(callbacks=[ExplosionGuard(), ArchitectureAdvisor(observe_steps=200)])
    """

    def __init__(
        self,
        observe_steps: int = 100,
        stall_improvement: float = 0.1,
        forward_fn: ForwardFn | None = None,
        watch_logits: bool = True,
        logit_every_n_steps: int = 10,
        attention_modules: Sequence[str] | Mapping[str, tuple[str, str]] | None = None,
        output_module: str | None = None,
        advise_optimizer: bool = True,
        optimizer_every_n_steps: int = 5,
    ) -> None:
        check_int(observe_steps, "observe_steps", 10)  # a loss trend needs steps
        check_open_interval(stall_improvement, "stall_improvement", 0.0, 1.0)
        check_flag(watch_logits, "watch_logits")
        check_int(logit_every_n_steps, "logit_every_n_steps", 1)
        check_flag(advise_optimizer, "advise_optimizer")
        check_int(optimizer_every_n_steps, "optimizer_every_n_steps", 1)
        super().__init__(forward_fn)
        self.watch_logits = watch_logits
        self.logit_every_n_steps = logit_every_n_steps
        self.attention_modules = attention_modules
        self.output_module = output_module
        self.logit_watch: LogitWatch | None = None
        self._logit_state: dict[str, Any] | None = None
        self._logit_step: int | None = None
        self.observe_steps = observe_steps
        self.stall_improvement = float(stall_improvement)
        self.graph: ModelGraph | None = None
        self.first_look: Report | None = None
        self._losses: list[Tensor] = []
        self._group_norms: dict[int, list[Tensor]] = {}
        self._group_names: dict[int, tuple[str, ...]] = {}
        self._reported = False
        self._traced = False
        self._sizes: dict[str, int] = {}
        self.advise_optimizer = advise_optimizer
        self.optimizer_every_n_steps = optimizer_every_n_steps
        self._matrix_names: dict[int, tuple[str, ...]] = {}  # weight matrices of each optimizer, in layout order
        self._matrix_index: dict[int, Tensor] = {}  # their positions in the layout (device, built once)
        self._matrix_norms: dict[int, list[Tensor]] = {}  # per sample: [2, M] (gradient norms, weight norms)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._arm_logit_watch(trainer, pl_module)  # a probe forward below is overwritten by the step's own
        if self._traced or self._reported:
            return
        self._traced = True
        self.first_look, self.graph = first_batch_measurement(
            trainer, pl_module, batch, batch_idx, self.forward_fn, source="ArchitectureAdvisor"
        )

    def _arm_logit_watch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.watch_logits or not self._observing(trainer):
            return
        if self.logit_watch is None:
            self.logit_watch = LogitWatch(pl_module, self.attention_modules, self.output_module)
            if self._logit_state is not None:
                self.logit_watch.load_state_dict(self._logit_state)
        step = trainer.global_step
        if step % self.logit_every_n_steps == 0 and step != self._logit_step:
            self.logit_watch.active, self._logit_step = True, step

    def _observing(self, trainer: pl.Trainer) -> bool:
        return not self._reported and trainer.global_step < self.observe_steps

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._observing(trainer):
            return
        index = optimizer_index(trainer, optimizer)
        stats = gradient_stats(trainer, pl_module, optimizer)
        names, norms = stats.group_norms("module")
        if index not in self._group_names:  # parameters per group, for per-element comparisons
            modules = dict(pl_module.named_modules())
            self._sizes.update(
                {
                    name: sum(p.numel() for p in modules[name].parameters(recurse=False))
                    for name in names
                    if name in modules
                }
            )
        self._group_names[index] = names
        self._group_norms.setdefault(index, []).append(norms.detach())
        if self.advise_optimizer and trainer.global_step % self.optimizer_every_n_steps == 0:
            self._sample_matrices(index, stats)

    def _sample_matrices(self, index: int, stats: GradientStats) -> None:
        """Keep the gradient and weight norms of the weight matrices (2+ dimensions) of this step, on the device."""
        if index not in self._matrix_index:
            positions = [i for i, p in enumerate(stats.layout.parameters) if p.dim() >= 2]
            names = tuple(stats.layout.names[i] for i in positions)
            if self._matrix_names.get(index, names) != names:  # resumed with another model: start over
                self._matrix_norms.pop(index, None)
            self._matrix_names[index] = names
            self._matrix_index[index] = torch.tensor(positions, dtype=torch.long, device=stats.param_sq_norms.device)
        matrix_positions = self._matrix_index[index]
        if matrix_positions.numel():
            sample = torch.stack([
                stats.param_norms().index_select(0, matrix_positions),
                stats.weight_norms().index_select(0, matrix_positions),
            ])
            self._matrix_norms.setdefault(index, []).append(sample.detach())

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.logit_watch is not None and self.logit_watch.active:
            # cast: the watch is armed only in _arm_logit_watch, which sets _logit_step with it
            self.logit_watch.record(cast(int, self._logit_step))
        if self._reported:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1 and trainer.global_step <= self.observe_steps:
            self._losses.append(loss.detach().float().reshape(()))
        if trainer.global_step >= self.observe_steps:
            self._advise(trainer, pl_module, window_complete=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run shorter than the window still gets advice; the observations stay, so a resume continues them
        if not self._reported and (self._losses or self._group_norms or self._matrix_norms):
            self._advise(trainer, pl_module, window_complete=False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)  # the end-of-fit summary, printed once
        forget_trainer(trainer)

    def _advise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, window_complete: bool) -> None:
        losses = _stacked(self._losses).tolist() if self._losses else []  # one host sync
        findings = loss_findings(self.graph, losses, self.stall_improvement) + self._gradient_findings()
        findings += self._guard_findings(trainer)
        findings += self._optimizer_findings(trainer, pl_module, losses, findings)
        findings += self._logit_findings(trainer)
        self.report = Report(findings, model=type(pl_module).__name__, source="ArchitectureAdvisor")
        if window_complete:
            self._reported = True
            self._losses, self._group_norms, self._matrix_norms = [], {}, {}
            if self.logit_watch is not None:
                self.logit_watch.remove()
        else:
            self.report.notes.append(
                f"Partial window: training ended after {trainer.global_step} of {self.observe_steps} observed steps."
            )
        publish_report(trainer, self.report, self._log_dir, ADVISOR_FILENAME)

    def _logit_findings(self, trainer: pl.Trainer) -> list[Finding]:
        """The logit watch's findings, and growth that a guard's QK-clip held down (the watch cannot see a trend
        in capped logits; the guard's record of what it rescaled is the evidence)."""
        findings = self.logit_watch.findings() if self.logit_watch is not None else []
        if not self.watch_logits:
            return findings
        named = [m for f in findings if f.code == "attention.logit_growth" for m in f.modules]
        seq_len = (self.logit_watch.seq_len if self.logit_watch is not None else None) or 2
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            caps = getattr(callback, "attention_logit_caps", None)
            if callable(caps):
                findings += capped_logit_findings(caps(), max(seq_len, 2), named)
        return findings

    def _gradient_findings(self) -> list[Finding]:
        medians: dict[str, float] = {}
        for index, norms in self._group_norms.items():
            stacked = _stacked(norms)  # a non-finite step (skipped by a guard) is no measurement of the trend
            finite = stacked.where(stacked.isfinite(), torch.full_like(stacked, math.nan))
            values = finite.nanmedian(dim=0).values.tolist()  # one host sync per optimizer
            medians.update(zip(self._group_names[index], values, strict=True))
        steps = max((len(norms) for norms in self._group_norms.values()), default=0)
        return gradient_findings(self.graph, medians, steps, self._sizes)

    def _guard_findings(self, trainer: pl.Trainer) -> list[Finding]:
        # Trainer.callbacks is set by Lightning's callback connector at init; the class does not declare it
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        return guard_findings(self.graph, collect_guard_events(callbacks), self.observe_steps)

    def _optimizer_findings(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, losses: list[float], other: list[Finding]
    ) -> list[Finding]:
        findings: list[Finding] = []
        for index, samples in self._matrix_norms.items():
            if index >= len(trainer.optimizers) or not samples:
                continue
            optimizer = trainer.optimizers[index]
            names = self._matrix_names[index]
            rows = _stacked(samples).tolist()  # [samples][grad/weight][matrix]: one host sync per optimizer
            grads = {name: [row[0][i] for row in rows] for i, name in enumerate(names)}
            weights = {name: [row[1][i] for row in rows] for i, name in enumerate(names)}
            ratios = {
                name: [g / w if w > 0 else math.nan for g, w in zip(grads[name], weights[name], strict=True)]
                for name in names
            }
            layout = parameter_layout(trainer, pl_module, optimizer)
            decay = parameter_weight_decay(optimizer, zip(layout.names, layout.parameters, strict=True))
            findings += adaptive_optimizer_findings(optimizer, ratios, losses, self.stall_improvement, other)
            findings += weight_decay_findings(weights, grads, losses, self.stall_improvement, decay)
        return findings

    @override
    def state_dict(self) -> dict[str, Any]:
        return (
            {
                "version": STATE_VERSION,
                "reported": self._reported,
                "losses": _stacked(self._losses).tolist() if self._losses else [],
                "group_names": {index: list(names) for index, names in self._group_names.items()},
                "group_norms": {index: _stacked(norms).tolist() for index, norms in self._group_norms.items()},
            }
            | self._matrix_state()
            | self._logit_watch_state()
        )

    def _matrix_state(self) -> dict[str, Any]:
        """The optimizer evidence's samples while the window is open (a reported window needs none to resume)."""
        if self._reported or not self._matrix_norms:
            return {}
        return {
            "matrix_names": {index: list(names) for index, names in self._matrix_names.items()},
            "matrix_norms": {index: _stacked(norms).tolist() for index, norms in self._matrix_norms.items() if norms},
        }

    def _logit_watch_state(self) -> dict[str, Any]:
        """The logit watch's history while the window is open (a reported window needs none to resume)."""
        if self._reported:
            return {}
        state = self.logit_watch.state_dict() if self.logit_watch is not None else self._logit_state
        return {"logit_watch": state} if state is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version("ArchitectureAdvisor", state_dict)
        self._reported = bool(state_dict["reported"])
        self._losses = [torch.tensor(v) for v in state_dict["losses"]]
        self._group_names = {int(i): tuple(names) for i, names in state_dict["group_names"].items()}
        self._group_norms = {int(i): list(torch.tensor(rows)) for i, rows in state_dict["group_norms"].items()}
        # absent from checkpoints written before the optimizer advice: the window's optimizer samples start empty
        self._matrix_names = {int(i): tuple(names) for i, names in state_dict.get("matrix_names", {}).items()}
        self._matrix_norms = {
            int(i): list(torch.tensor(rows)) for i, rows in state_dict.get("matrix_norms", {}).items()
        }
        self._matrix_index = {}
        self._logit_state = state_dict.get("logit_watch")  # applied when the watch attaches at the next batch
        if self.logit_watch is not None:
            self.logit_watch.remove()
        self.logit_watch = None


def _stacked(tensors: list[Tensor]) -> Tensor:
    """Stack on the device of the newest tensor (values restored from a checkpoint live on the CPU)."""
    device = tensors[-1].device
    return torch.stack([t.to(device) for t in tensors])
