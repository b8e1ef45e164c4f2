"""``ArchitectureAdvisor``: watch the first steps of training and name the architectural cause of trouble."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradstab.callbacks._reporting import (
    ForwardFn,
    ReportingCallback,
    eager,
    probing,
    publish_report,
)
from lightning_gradstab.callbacks._shared import (
    STATE_VERSION,
    check_state_version,
    forget_trainer,
    gradient_stats,
    optimizer_index,
)
from lightning_gradstab.diagnosis import ModelGraph, preserved_state, trace
from lightning_gradstab.diagnosis.arch_rules import (
    activation_finding,
    normalization_finding,
    recurrent_findings,
    residual_finding,
)
from lightning_gradstab.diagnosis.signal_rules import RATIO_ERROR, RATIO_WARNING
from lightning_gradstab.policy import RUNGS
from lightning_gradstab.report import Finding, Report

ADVISOR_FILENAME = "gradstab_advisor.json"


class ArchitectureAdvisor(ReportingCallback):
    """Read the first ``observe_steps`` optimizer steps and recommend architectural fixes.

    It never recomputes gradient norms: per-layer norms come from the suite's shared statistics
    (``gradient_stats`` in ``on_before_optimizer_step``) and stay on the device until the window ends, when
    one host transfer feeds the rules. The model graph comes from one no-grad trace of ``training_step`` on
    the first batch. Findings:

    - ``arch.residual`` (error) when a plain chain of >= 20 layers trains with a stalling loss (relative
      improvement below ``stall_improvement`` from the first to the last tenth of the window): the
      degradation problem of plain nets (He et al. 2016), which shows in the loss, not in gradient norms.
    - ``signal.vanishing``/``signal.exploding`` when the median weight-gradient norm of the first layer is
      100x below/above the last, then ``arch.normalization`` and ``arch.activation`` for the structural cause.
    - ``signal.exploding`` when an ``ExplosionGuard`` in ``trainer.callbacks`` met an anomaly or escalated
      during the window (read from its public ``policies[i].events``; optional), plus ``arch.recurrent`` for
      vanilla RNNs.

    Global rank 0 publishes the report like ``InitAudit`` (console, TensorBoard ``gradstab/findings``,
    ``<log_dir>/gradstab_advisor.json``). It changes nothing in training.

    Args:
        observe_steps: optimizer steps to watch before reporting (reported at the end of training if shorter).
        stall_improvement: relative loss decrease below which the loss counts as stalled.
        forward_fn: ``forward_fn(pl_module, batch) -> output`` used for the graph trace instead of
            ``training_step`` (needed under manual optimization).

    Example::

        trainer = pl.Trainer(callbacks=[ExplosionGuard(), ArchitectureAdvisor(observe_steps=200)])
    """

    def __init__(
        self, observe_steps: int = 100, stall_improvement: float = 0.1, forward_fn: ForwardFn | None = None
    ) -> None:
        if not isinstance(observe_steps, int) or isinstance(observe_steps, bool) or observe_steps < 10:
            raise ValueError(f"`observe_steps` must be an int >= 10 (a loss trend needs steps), got {observe_steps!r}")
        if not isinstance(stall_improvement, (int, float)) or not 0.0 < stall_improvement < 1.0:
            raise ValueError(f"`stall_improvement` must be a float in (0, 1), got {stall_improvement!r}")
        super().__init__(forward_fn)
        self.observe_steps = observe_steps
        self.stall_improvement = float(stall_improvement)
        self.graph: ModelGraph | None = None
        self._losses: list[Tensor] = []
        self._group_norms: dict[int, list[Tensor]] = {}
        self._group_names: dict[int, tuple[str, ...]] = {}
        self._reported = False
        self._traced = False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._traced or self._reported:
            return
        self._traced = True
        self.graph = self._trace(pl_module, batch, batch_idx)

    def _trace(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> ModelGraph | None:
        if self.forward_fn is None and not pl_module.automatic_optimization:
            return None
        forward_fn = self.forward_fn
        step = eager(pl_module, "training_step")

        def forward(inputs: Any) -> Any:
            with probing(pl_module):
                return forward_fn(pl_module, inputs) if forward_fn is not None else step(inputs, batch_idx)

        try:
            with preserved_state(pl_module), torch.no_grad():
                graph, _ = trace(pl_module, forward, inputs=batch)
        except Exception as error:  # advice only: never stop training
            rank_zero_warn(f"lightning_gradstab: ArchitectureAdvisor could not trace the model: {error!r}")
            return None
        return graph

    def _observing(self, trainer: pl.Trainer) -> bool:
        return not self._reported and trainer.global_step < self.observe_steps

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._observing(trainer):
            return
        index = optimizer_index(trainer, optimizer)
        names, norms = gradient_stats(trainer, pl_module, optimizer).group_norms("module")
        self._group_names[index] = names
        self._group_norms.setdefault(index, []).append(norms.detach())

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
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
        if not self._reported and (self._losses or self._group_norms):
            self._advise(trainer, pl_module, window_complete=False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)  # the end-of-fit summary, printed once
        forget_trainer(trainer)

    def _advise(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, window_complete: bool) -> None:
        findings = self._loss_findings() + self._gradient_findings() + self._guard_findings(trainer)
        self.report = Report(findings, model=type(pl_module).__name__, source="ArchitectureAdvisor")
        if window_complete:
            self._reported = True
            self._losses, self._group_norms = [], {}
        else:
            self.report.notes.append(
                f"Partial window: training ended after {trainer.global_step} of {self.observe_steps} observed steps."
            )
        publish_report(trainer, self.report, self._log_dir, ADVISOR_FILENAME)

    def _loss_findings(self) -> list[Finding]:
        losses = _stacked(self._losses).tolist() if self._losses else []  # one host sync
        if len(losses) < 10 or self.graph is None:
            return []
        tenth = max(1, len(losses) // 10)
        first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
        improvement = (first - last) / abs(first) if first and math.isfinite(last) else 0.0
        if improvement >= self.stall_improvement:
            return []
        evidence = {
            "loss_first": first,
            "loss_last": last,
            "relative_improvement": improvement,
            "stall_threshold": self.stall_improvement,
            "batches_observed": len(losses),
        }
        return residual_finding(self.graph, evidence)

    def _gradient_findings(self) -> list[Finding]:
        medians: dict[str, float] = {}
        for index, norms in self._group_norms.items():
            values = _stacked(norms).median(dim=0).values.tolist()  # one host sync per optimizer
            medians.update(zip(self._group_names[index], values, strict=True))
        order = [layer.name for layer in self.graph.layers if layer.kind != "embedding"] if self.graph else []
        layers = [name for name in order if medians.get(name)] or [n for n, v in medians.items() if v]
        if len(layers) < 3:
            return []
        ratio = medians[layers[0]] / medians[layers[-1]]
        if 1 / RATIO_WARNING <= ratio <= RATIO_WARNING:
            return []
        vanishing = ratio < 1.0
        magnitude = 1 / ratio if vanishing else ratio
        signal = Finding(
            "signal.vanishing" if vanishing else "signal.exploding",
            "error" if magnitude > RATIO_ERROR else "warning",
            (layers[0], layers[-1]),
            {
                "weight_grad_first_over_last_median": ratio,
                "layers": len(layers),
                "optimizer_steps_observed": max(len(norms) for norms in self._group_norms.values()),
            },
            f"Gradients {'vanish' if vanishing else 'explode'} from {layers[-1]} toward {layers[0]} during "
            "training: see arch.normalization / arch.activation, or run diagnose() for the per-layer deltas.",
        )
        findings = [signal]
        if self.graph is not None:
            findings += normalization_finding(self.graph, [signal]) + activation_finding(self.graph)
        return findings

    def _guard_findings(self, trainer: pl.Trainer) -> list[Finding]:
        events: list[dict[str, Any]] = []  # the guard's evidence of explosions within the window
        for callback in trainer.callbacks:
            for policy in dict(getattr(callback, "policies", None) or {}).values():
                for event in getattr(policy, "events", []):
                    if not isinstance(event, Mapping) or event.get("step", 0) > self.observe_steps:
                        continue
                    if _means_explosion(event):
                        events.append(dict(event))
        if not events:
            return []
        findings = [
            Finding(
                "signal.exploding",
                "warning",
                (),
                {
                    "guard_events": len(events),
                    "max_level": max(e.get("level", 0) for e in events),
                    "anomalies": sorted({str(e["anomaly"]) for e in events if e.get("anomaly")}),
                    "first_step": min(e.get("step", 0) for e in events),
                },
                "ExplosionGuard acted during the first steps: lower the learning rate or add warmup, and fix "
                "the architectural findings listed with this one.",
            )
        ]
        if self.graph is not None:
            findings += recurrent_findings(self.graph)
        return findings

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "reported": self._reported,
            "losses": _stacked(self._losses).tolist() if self._losses else [],
            "group_names": {index: list(names) for index, names in self._group_names.items()},
            "group_norms": {index: _stacked(norms).tolist() for index, norms in self._group_norms.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version("ArchitectureAdvisor", state_dict)
        self._reported = bool(state_dict["reported"])
        self._losses = [torch.tensor(v) for v in state_dict["losses"]]
        self._group_names = {int(i): tuple(names) for i, names in state_dict["group_names"].items()}
        self._group_norms = {int(i): list(torch.tensor(rows)) for i, rows in state_dict["group_norms"].items()}


EXPLOSIVE_SPIKE_RATIO = 10.0
"""A clipped spike counts as exploding gradients when its norm was this many times its clip threshold."""


def _means_explosion(event: Mapping[str, Any]) -> bool:
    """Whether a guard event is evidence of exploding gradients rather than routine adaptive clipping.

    The guard's resting rung clips the top of the healthy norm distribution (ZClip's band, about 1 % of the
    steps of a healthy run); such a clip is no finding. Escalations past that rung, non-finite gradients,
    growth, drift and a collapsing loss scale are; so is a spike an order of magnitude above its threshold.
    """
    if event.get("level", 0) > max(event.get("previous_level", 0), RUNGS.index("clip")):
        return True
    anomaly = event.get("anomaly")
    if anomaly != "spike":
        return anomaly is not None
    norm, threshold = event.get("total_norm"), event.get("clip_threshold")
    return norm is None or not threshold or norm >= EXPLOSIVE_SPIKE_RATIO * threshold


def _stacked(tensors: list[Tensor]) -> Tensor:
    """Stack on the device of the newest tensor (values restored from a checkpoint live on the CPU)."""
    device = tensors[-1].device
    return torch.stack([t.to(device) for t in tensors])
