"""GradNormMonitor: log gradient norms, ratios and pictures from the shared statistics, nearly for free."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gradstab import tensorboard
from lightning_gradstab.adam_state import AdamStateTracker
from lightning_gradstab.arguments import check_flag, check_interval
from lightning_gradstab.callbacks._monitor_pictures import add_gradient_flow_figure, add_histograms, draw_heatmap
from lightning_gradstab.callbacks._monitor_queue import ScalarQueue
from lightning_gradstab.callbacks._shared import (
    SuiteCallback,
    add_tensorboard_layout,
    forget_trainer,
    gradient_stats,
    logging_step,
    optimizer_index,
    parameter_layout,
    print_fit_summary,
    request_self_check,
)
from lightning_gradstab.distributed import refuse_unsupported_strategy
from lightning_gradstab.stats import (
    GradientStats,
    GroupBy,
    layout_norms,
    validate_group_by,
)


def _validate_norm_type(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`norm_type` must be a positive float or math.inf, got {value!r}")
    if not (value > 0):  # also rejects NaN
        raise ValueError(f"`norm_type` must be a positive float or math.inf (e.g. 1, 2, inf), got {value!r}")
    return float(value)


PER_LAYER_SCALARS_MAX_GROUPS = 16
"""With ``per_layer_scalars=None`` a model with more groups than this per optimizer gets no per-layer scalars.

Four statistics per group make ~65 charts at this size; beyond it the Scalars tab is a wall of near-identical
charts, and the heat map (one image) and the log10 layer range (four lines) show the same picture."""

SPREAD = ("layer_min", "layer_median", "layer_max")
"""The three per-layer statistics of :func:`log10_spread`, in its order (tag suffixes)."""

HEATMAP_MAX_COLUMNS = 512
"""The heat map keeps at most this many optimizer steps (on the device): when full, every other one is dropped."""


def log10_spread(values: Tensor) -> Tensor:
    """log10 of the smallest non-zero, the median and the largest finite value (device ops, no sync)."""
    logs = values.float().log10()
    if logs.numel() == 0:  # no group has parameters to measure
        return torch.full((3,), math.nan, device=values.device)
    finite = torch.isfinite(logs)
    low = torch.where(finite, logs, torch.full_like(logs, math.inf)).min()
    high = torch.where(finite, logs, torch.full_like(logs, -math.inf)).max()
    return torch.stack([low, torch.where(finite, logs, torch.full_like(logs, math.nan)).nanmedian(), high])


@dataclass
class _Plan:
    """What the per-step hook needs for one optimizer, found once per fit (not rebuilt every step)."""

    index: int
    scope: str
    step_tags: tuple[str, ...]
    rank_zero: bool
    heat: tensorboard.HeatmapBuffer | None  # per-parameter squared L2 norms of every step (rank 0)
    heat_groups: tuple[tuple[str, ...], Tensor]  # group names, each parameter's group (drawing sums them)
    heat_drawn_at: int = 0
    adam: AdamStateTracker | None = None  # Adam-family optimizers, with adam_every_n_steps set


class GradNormMonitor(SuiteCallback):
    r"""Log gradient norms, gradient-to-weight and update-to-weight ratios, histograms and a gradient-flow figure.

    Reads the suite's shared gradient statistics (one fused ``torch._foreach_norm`` pass per optimizer step,
    computed in ``on_before_optimizer_step``: after AMP unscaling, on the accumulated and, under DDP,
    all-reduced gradients). Values stay on the device and reach the loggers in one batched, asynchronous copy
    every ``log_every_n_steps`` steps, so the monitor adds no host sync to the training step.

    Logged under ``gradstab/`` (with ``opt{i}/`` inserted when there are several optimizers):

    - ``grad_norm/total`` and ``nonfinite/count`` every optimizer step;
    - every ``log_every_n_steps`` steps: ``log10_grad_norm/{total,layer_min,layer_median,layer_max}`` (log10 of
      the total and of the smallest non-zero, median and largest group norm: the per-layer spread on a log
      scale in four lines, whatever the depth) and, with per-layer scalars on, ``grad_norm/{group}`` and
      ``grad_to_weight/{group}``;
    - ``grad_max/total`` (and ``grad_max/{group}``) with ``log_inf_norm=True``;
    - ``log10_update/{layer_min,layer_median,layer_max}`` (log10 of, and ``update_to_weight/{group}``), ‖Δw‖/‖w‖
      of the optimizer step, with ``update_to_weight=True``;
    - every ``adam_every_n_steps`` steps, for Adam-family optimizers: ``adam/log10_update_rms/{layer_min,
      layer_median,layer_max}``, ``adam/outlier_fraction/{total,layer_max}``,
      ``adam/log10_recent_grad_sq_ratio/{layer_min,layer_median}`` and ``adam/log10_second_moment_change/
      {layer_min,layer_median}`` (from the second evidence step on), and with per-layer scalars
      ``adam/update_rms/{group}`` and ``adam/outlier_fraction/{group}``;
    - TensorBoard images: ``gradient_flow_over_time`` (layer x step heat map of log10 L2 gradient norms, every
      optimizer step) and ``gradient_flow``; histograms ``grad_hist/{group}``.

    With a ``TensorBoardLogger`` the "Gradient stability" custom-scalar layout is registered at fit start, with
    only the charts the suite's callbacks will fill.

    Args:
        group_by: ``"module"`` (one group per module owning parameters), ``"parameter"``, or an int ``d``:
            module path cut at depth ``d`` (``"encoder.layers.3.attn"`` → ``"encoder.layers"`` for ``d=2``).
        log_every_n_steps: interval of the per-group statistics; ``None`` uses the trainer's.
        norm_type: order of the logged norms (``2``: free from the shared pass; others cost one more pass).
        log_inf_norm: also log the largest absolute gradient entry per group (one more pass on logging steps).
        log_grad_to_weight: log ‖grad‖/‖w‖ per group on logging steps.
        update_to_weight: log ‖Δw‖/‖w‖ per group on logging steps; copies the weights on those steps only.
        histogram_every_n_steps: interval of gradient histograms (TensorBoard only). ``None`` (default) disables
            them: each one copies every gradient to the host and bins it with NumPy.
        figure_every_n_steps: interval of the gradient-flow figure (TensorBoard only). ``None`` (default)
            disables it: a matplotlib figure costs tens of milliseconds.
        heatmap_every_n_steps: interval at which the layer x step heat map is redrawn (also at the end of
            training, so the last step is in it). Its columns are every optimizer step (at most
            :data:`HEATMAP_MAX_COLUMNS`, kept on the device: one host transfer per drawing), whatever
            ``log_every_n_steps``. It shows L2 norms whatever ``norm_type``: they come free from the shared pass
            and need no collective, so under sharded strategies rank 0 can keep the map alone (another order
            would cost a pass and a collective every step, on every rank). Each step costs one device copy of
            the per-parameter squared norms; they are summed into layers when the map is drawn. Without a
            TensorBoard logger it is written as a PNG into the log directory (said once). ``None`` disables it.
        adam_every_n_steps: interval of the Adam-state evidence (:mod:`lightning_gradstab.adam_state`), for
            ``torch.optim.Adam``/``AdamW`` optimizers (others get none, silently): the RMS of the update Adam is
            about to apply, the share of coordinates with ``g^2 > 25 v_hat`` and the second moment's decay, from
            one fused pass over the gradients and both moments on those steps only. Logged under
            ``gradstab/adam/`` and left on the step's statistics (``GradientStats.adam``) for the guard.
            ``None`` (default) disables it: one evidence pass costs 13-30x the foreach-norm floor on CPU (about
            14 elementwise passes over gradients and moments against one read-only norm pass; see
            benchmarks/results/guard-overhead-cpu-v4.md), so an interval of 100 adds 0.1-0.3x the floor per
            step.
        per_layer_scalars: log one scalar per group and statistic. ``None`` (default): only for models with
            at most :data:`PER_LAYER_SCALARS_MAX_GROUPS` groups per optimizer, so the Scalars tab of a deep model
            stays navigable (the heat map and the log10 layer range carry the per-layer picture).
        self_check: on the first optimizer step, also compute the total norm independently (every sharded
            gradient gathered whole) and warn with both numbers if they differ by more than 1e-4 relative: proof
            that the norms are right for this parallel layout, for one step's gathering cost. Both numbers land
            in ``self_check_results[optimizer_index]``.

    Example::

        trainer = Trainer(callbacks=[GradNormMonitor(group_by=2, figure_every_n_steps=200)])
    """

    def __init__(
        self,
        group_by: GroupBy = "module",
        log_every_n_steps: int | None = None,
        norm_type: float = 2.0,
        log_inf_norm: bool = False,
        log_grad_to_weight: bool = True,
        update_to_weight: bool = False,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        heatmap_every_n_steps: int | None = 100,
        adam_every_n_steps: int | None = None,
        per_layer_scalars: bool | None = None,
        self_check: bool = False,
    ) -> None:
        self.group_by = validate_group_by(group_by)
        self.log_every_n_steps = check_interval(log_every_n_steps, "log_every_n_steps")
        self.norm_type = _validate_norm_type(norm_type)
        self.log_inf_norm = check_flag(log_inf_norm, "log_inf_norm")
        self.log_grad_to_weight = check_flag(log_grad_to_weight, "log_grad_to_weight")
        self.update_to_weight = check_flag(update_to_weight, "update_to_weight")
        self.histogram_every_n_steps = check_interval(histogram_every_n_steps, "histogram_every_n_steps")
        self.figure_every_n_steps = check_interval(figure_every_n_steps, "figure_every_n_steps")
        self.heatmap_every_n_steps = check_interval(heatmap_every_n_steps, "heatmap_every_n_steps")
        self.adam_every_n_steps = check_interval(adam_every_n_steps, "adam_every_n_steps")
        if per_layer_scalars is not None:
            check_flag(per_layer_scalars, "per_layer_scalars")
        self.per_layer_scalars = per_layer_scalars
        self.self_check = check_flag(self_check, "self_check")
        self.self_check_results: dict[int, tuple[float, float]] = {}  # optimizer index -> (suite, gathered)
        self._per_layer = True
        self._layer_tags: set[str] = set()
        self._plans: dict[int, _Plan] = {}  # id(optimizer as the hook receives it) -> what its steps need
        self._interval = 50
        self._queue = ScalarQueue()  # device scalars on their way to the loggers
        self._weights_before: dict[int, tuple[int, str, GradientStats, list[Tensor] | tuple[Tensor, ...]]] = {}
        self._hook_handles: list[Any] = []
        self._trainer: pl.Trainer | None = None  # for the optimizer post-step hook, which gets no trainer

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Trainer.log_every_n_steps is set by Lightning's logger connector at init; the class does not declare it
        self._interval = self.log_every_n_steps or max(1, trainer.log_every_n_steps)  # type: ignore[attr-defined]
        refuse_unsupported_strategy(trainer.strategy, "GradNormMonitor")
        if self.self_check:
            request_self_check(trainer)
        if stage == "fit" and not trainer.loggers:
            rank_zero_warn("GradNormMonitor: the trainer has no logger, so nothing will be logged.")

    @override
    def tensorboard_charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """Titles of the ``tensorboard.CHARTS`` this monitor fills with its settings on this model."""
        groups = max(
            (len(parameter_layout(trainer, pl_module, o).group_index(self.group_by)[0]) for o in trainer.optimizers),
            default=0,
        )
        self._per_layer = groups <= PER_LAYER_SCALARS_MAX_GROUPS if self.per_layer_scalars is None else (
            self.per_layer_scalars
        )
        charts = ["total gradient norm and clip threshold", "non-finite gradients",
                  "log10 gradient norm: total and smallest / median / largest layer"]
        if self.update_to_weight:
            charts.append("log10 update-to-weight ratio: smallest / median / largest layer")
        if self.log_inf_norm:
            charts.append("max |grad|")
        if self.adam_every_n_steps and any(AdamStateTracker.supports(o) for o in trainer.optimizers):
            charts += [title for title in tensorboard.CHARTS if title.startswith("Adam ")]
        if self._per_layer:
            charts.append("per-layer gradient norms")
            charts += ["gradient-to-weight ratios"] if self.log_grad_to_weight else []
            charts += ["update-to-weight ratios"] if self.update_to_weight else []
        return charts

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.tensorboard_charts(trainer, pl_module)  # decides per-layer scalars from the model's group count
        add_tensorboard_layout(trainer, pl_module)
        self._trainer = trainer
        self._plans = {}
        if self.update_to_weight:
            for optimizer in trainer.optimizers:
                self._hook_handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # the hot path: everything that does not change between steps (the optimizer's index and scope, the
        # per-step tags, the heat map's buffer) is looked up once per fit in _plan; each step adds one small
        # stack and one device copy to the shared statistics, and reads nothing back
        stats = gradient_stats(trainer, pl_module, optimizer)
        plan = self._plans.get(id(optimizer)) or self._plan(trainer, optimizer, stats)
        if stats.self_check is not None:
            self.self_check_results[plan.index] = stats.self_check
        step = logging_step(trainer)
        values = [torch.stack([stats.total(self.norm_type), stats.nonfinite_count])]
        names: Sequence[str] = plan.step_tags
        if step % self._interval == 0:
            names = list(names)
            for group_names, group_values in self._group_scalars(stats, plan.scope):
                names += group_names
                values.append(group_values)
            if self.update_to_weight:
                raw = getattr(optimizer, "_optimizer", optimizer)
                self._weights_before[id(raw)] = (
                    step, plan.scope, stats, torch._foreach_mul(stats.layout.weights(), 1.0)
                )
        if plan.adam is not None and step % self.adam_every_n_steps == 0:  # type: ignore[operator]
            names, values = self._adam_scalars(trainer, optimizer, stats, plan, names, values)
        if plan.heat is not None:  # rank 0 only; L2 from the shared pass: no collective, so no rank can hang
            plan.heat.add(step, stats.param_sq_norms)
            if step - plan.heat_drawn_at >= self.heatmap_every_n_steps:  # type: ignore[operator]
                self._draw_heatmap(trainer, plan)
        if self.histogram_every_n_steps and step % self.histogram_every_n_steps == 0:
            add_histograms(trainer, stats, self.group_by, plan.scope, step)
        if self.figure_every_n_steps and step % self.figure_every_n_steps == 0:
            add_gradient_flow_figure(trainer, stats, self.group_by, plan.scope, step)
        if plan.rank_zero:
            self._queue.add(step, names, values)
            if step % self._interval == 0:
                self._queue.start_copy()
            if self._queue.in_flight:
                self._emit(trainer, wait=False)

    def _plan(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, stats: GradientStats) -> _Plan:
        """What the per-step hook needs for ``optimizer``, looked up once per fit."""
        index = optimizer_index(trainer, optimizer)
        scope = f"opt{index}/" if len(trainer.optimizers) > 1 else ""
        rank_zero = trainer.global_rank == 0
        groups = stats.layout.group_index(self.group_by)
        heat = None
        if self.heatmap_every_n_steps and rank_zero:
            heat = tensorboard.HeatmapBuffer(groups[0], HEATMAP_MAX_COLUMNS, width=len(stats.layout))
        tags = (f"gradstab/grad_norm/{scope}total", f"gradstab/nonfinite/{scope}count")
        adam = None
        if self.adam_every_n_steps and AdamStateTracker.supports(optimizer):
            adam = AdamStateTracker(getattr(optimizer, "_optimizer", optimizer))
        plan = _Plan(index, scope, tags, rank_zero, heat, groups, adam=adam)
        self._plans[id(optimizer)] = plan
        return plan

    def _adam_scalars(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, stats: GradientStats, plan: _Plan,
        names: Any, values: list[Tensor],
    ) -> tuple[Any, list[Tensor]]:
        """Compute (every rank: a collective when sharded) or reuse the step's Adam-state evidence, leave it on
        ``stats.adam`` and queue its scalars."""
        assert plan.adam is not None
        if stats.adam is None:
            raw = getattr(optimizer, "_optimizer", optimizer)
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            fused = any(group.get("fused") for group in raw.param_groups)  # unscales inside step(): still scaled
            grad_scale = scaler._scale if scaler is not None and fused and scaler._scale is not None else None
            stats.adam = plan.adam.compute(stats, grad_scale)
        if stats.adam is None or not plan.rank_zero:
            return names, values
        prefix = f"gradstab/adam/{plan.scope}"
        groups, per_group = stats.adam.group(self.group_by)
        names = list(names)
        names += [f"{prefix}log10_update_rms/{kind}" for kind in SPREAD]
        values.append(log10_spread(per_group["update_rms"]))
        names += [f"{prefix}outlier_fraction/total", f"{prefix}outlier_fraction/layer_max"]
        outliers = per_group["outlier_fraction"]
        values.append(torch.stack([stats.adam.total_outlier_fraction(), outliers.nan_to_num(nan=0.0).max()]))
        if plan.adam.calls > 1:
            for statistic in ("recent_grad_sq_ratio", "second_moment_change"):
                names += [f"{prefix}log10_{statistic}/{kind}" for kind in SPREAD[:2]]
                values.append(log10_spread(per_group[statistic])[:2])
        if self._per_layer:
            for statistic in ("update_rms", "outlier_fraction"):
                tags = [f"{prefix}{statistic}/{group}" for group in groups]
                self._layer_tags.update(tags)
                names += tags
                values.append(per_group[statistic])
        return names, values

    def _group_scalars(self, stats: GradientStats, scope: str) -> list[tuple[list[str], Tensor]]:
        """``(tag names, values)`` of the per-group statistics, one vector per kind.

        The per-group norms are always copied (the heat map reads them on the host); the other per-group
        vectors only with per-layer scalars on. Which tags are per-layer is remembered so that ``_emit`` can
        keep them from the loggers when per-layer scalars are off.
        """
        names, norms = stats.group_norms(self.group_by, self.norm_type)
        tags = [f"gradstab/grad_norm/{scope}{name}" for name in names]
        self._layer_tags.update(tags)
        log_tags = [f"gradstab/log10_grad_norm/{scope}{kind}" for kind in ("total", *SPREAD)]
        total = stats.total(self.norm_type).reshape(1)
        scalars = [(tags, norms), (log_tags, torch.cat([total.log10(), log10_spread(norms)]))]
        if not self._per_layer:
            if self.log_inf_norm:
                scalars.append(([f"gradstab/grad_max/{scope}total"], stats.total(math.inf).reshape(1)))
            return scalars
        if self.log_grad_to_weight:
            l2_norms = norms if self.norm_type == 2.0 else stats.group_norms(self.group_by)[1]
            _, weight_norms = stats.group_weight_norms(self.group_by)
            ratios = l2_norms / weight_norms.clamp_min(torch.finfo(torch.float32).tiny)
            scalars.append(([f"gradstab/grad_to_weight/{scope}{name}" for name in names], ratios))
        if self.log_inf_norm:
            _, maxima = stats.group_norms(self.group_by, math.inf)
            scalars.append(([f"gradstab/grad_max/{scope}{name}" for name in names], maxima))
            scalars.append(([f"gradstab/grad_max/{scope}total"], stats.total(math.inf).reshape(1)))
        return scalars

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        before = self._weights_before.pop(id(optimizer), None)
        if before is None or self._trainer is None:
            return
        step, scope, stats, old_weights = before
        deltas = torch._foreach_sub(stats.layout.weights(), old_weights)
        delta_sq = layout_norms(stats.layout, deltas, "update").square()  # any dtype, float64/complex too
        delta_sq = stats.sum_like_weights(delta_sq)  # sharded: each value counted once across ranks
        names, delta_norms = stats.group_sums(delta_sq.to(stats.param_sq_norms.device), self.group_by)
        _, weight_norms = stats.group_weight_norms(self.group_by)
        ratios = delta_norms.sqrt() / weight_norms.clamp_min(torch.finfo(torch.float32).tiny)
        tags = [f"gradstab/log10_update/{scope}{kind}" for kind in SPREAD]
        vectors = [log10_spread(ratios)]
        if self._per_layer:
            tags += [f"gradstab/update_to_weight/{scope}{name}" for name in names]
            vectors.append(ratios)
        self._record(self._trainer, step, tags, vectors)

    def _record(self, trainer: pl.Trainer, step: int, names: list[str], values: list[Tensor]) -> None:
        """Queue device scalars; every ``log_every_n_steps`` steps start one asynchronous host copy of all."""
        if trainer.global_rank != 0:
            return
        self._queue.add(step, names, values)
        if step % self._interval == 0:
            self._queue.start_copy()
        self._emit(trainer, wait=False)

    def _emit(self, trainer: pl.Trainer, wait: bool) -> None:
        """Log the finished host copies; per-layer tags are left out when per-layer scalars are off."""
        self._queue.emit(trainer, wait, leave_out=None if self._per_layer else self._layer_tags)

    def _draw_heatmap(self, trainer: pl.Trainer, plan: _Plan) -> None:
        assert plan.heat is not None
        plan.heat_drawn_at = draw_heatmap(trainer, plan.heat, plan.heat_groups, plan.scope)

    def _flush(self, trainer: pl.Trainer) -> None:
        self._queue.start_copy()
        self._emit(trainer, wait=True)
        for plan in self._plans.values():
            if plan.heat is not None and plan.heat.steps and plan.heat_drawn_at != plan.heat.latest_step:
                self._draw_heatmap(trainer, plan)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._flush(trainer)  # what was measured before the failure is often what explains it

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._flush(trainer)
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        self._weights_before.clear()
        self._trainer = None
        print_fit_summary(trainer)  # the suite's one end-of-fit summary (printed once)
        forget_trainer(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:  # build layouts before the first step, outside the hot path
            parameter_layout(trainer, pl_module, optimizer)
