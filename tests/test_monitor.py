"""GradNormMonitor logs exactly the norms a naive float64 computation gives, in every training set-up."""

from __future__ import annotations

import math
from collections import defaultdict

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradstab import GradNormMonitor
from lightning_gradstab.callbacks._shared import logging_step, optimizer_index
from lightning_gradstab.stats import group_name
from tests.conftest import reference_group_norms
from tests.helpers.models import TinyRegressor, TwoOptimizerModule
from tests.helpers.trainers import quiet_trainer


class ReferenceNorms(Callback):
    """Records float64 reference norms at the moment the monitor measures (before the optimizer step)."""

    def __init__(self, group_by="module") -> None:
        self.group_by = group_by
        self.seen: dict[tuple[int, str], tuple[dict[str, float], float]] = {}
        self.steps_per_scope: dict[str, int] = defaultdict(int)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scope = f"opt{optimizer_index(trainer, optimizer)}/" if len(trainer.optimizers) > 1 else ""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        groups, total = reference_group_norms(pl_module, lambda n: group_name(n, self.group_by), params)
        self.seen[(logging_step(trainer), scope)] = (groups, total)
        self.steps_per_scope[scope] += 1


def fit(model, callbacks, logger, max_steps=6, log_every_n_steps=2, **trainer_kwargs) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = quiet_trainer(
        callbacks=callbacks, logger=logger, max_steps=max_steps, log_every_n_steps=log_every_n_steps, **trainer_kwargs
    )
    trainer.fit(model)
    return trainer


def assert_logged_norms_match(logged, reference: ReferenceNorms, scopes=("",), rel=1e-5):
    for scope in scopes:
        totals = logged[f"gradstab/grad_norm/{scope}total"]
        assert len(totals) == reference.steps_per_scope[scope], "one total norm per optimizer step"
        for step, value in totals:
            assert value == pytest.approx(reference.seen[(step, scope)][1], rel=rel)
        group_steps = set()
        for (step, ref_scope), (groups, _) in reference.seen.items():
            if ref_scope != scope or step % 2:
                continue
            group_steps.add(step)
            for group, expected in groups.items():
                series = dict(logged[f"gradstab/grad_norm/{scope}{group}"])
                assert series[step] == pytest.approx(expected, rel=rel), (scope, group, step)
        assert group_steps, "per-group norms were logged on the logging steps"


@pytest.mark.parametrize(
    "precision, accumulate",
    [("32-true", 1), ("bf16-mixed", 1), ("32-true", 4)],
    ids=["fp32", "bf16-mixed", "accumulate-4"],
)
def test_logged_norms_equal_float64_reference(memory_logger, precision, accumulate):
    reference = ReferenceNorms()
    fit(
        TinyRegressor(),
        [GradNormMonitor(log_every_n_steps=2), reference],
        memory_logger,
        precision=precision,
        accumulate_grad_batches=accumulate,
        max_steps=4 if accumulate > 1 else 6,
    )
    assert_logged_norms_match(memory_logger.metrics, reference)
    assert memory_logger.metrics["gradstab/nonfinite/count"][0][1] == 0


def test_gradient_accumulation_logs_once_per_optimizer_step_on_the_accumulated_gradient(memory_logger):
    reference = ReferenceNorms()
    fit(TinyRegressor(), [GradNormMonitor(), reference], memory_logger, accumulate_grad_batches=4, max_steps=2)
    steps = [step for step, _ in memory_logger.metrics["gradstab/grad_norm/total"]]
    assert steps == [0, 1]  # 8 batches, 2 optimizer steps


def test_two_optimizers_with_manual_optimization_are_logged_separately(memory_logger):
    reference = ReferenceNorms()
    fit(TwoOptimizerModule(), [GradNormMonitor(log_every_n_steps=2), reference], memory_logger, max_steps=8)
    assert "gradstab/grad_norm/total" not in memory_logger.metrics
    assert_logged_norms_match(memory_logger.metrics, reference, scopes=("opt0/", "opt1/"))
    assert "gradstab/grad_norm/opt0/generator.0" in memory_logger.metrics
    assert "gradstab/grad_norm/opt1/critic.2" in memory_logger.metrics


def test_frozen_and_tied_parameters(memory_logger):
    reference = ReferenceNorms()
    model = TinyRegressor(depth=4, frozen=True, tied=True)
    fit(model, [GradNormMonitor(log_every_n_steps=2), reference], memory_logger)
    assert_logged_norms_match(memory_logger.metrics, reference)
    assert "gradstab/grad_norm/net.0" not in memory_logger.metrics  # frozen: not measured


def test_ratios_and_inf_norm_are_logged_with_their_definitions(memory_logger):
    class WeightsAndUpdates(Callback):
        def __init__(self):
            self.before, self.after = {}, []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            step = logging_step(trainer)
            self.before[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.grad_max = max(float(p.grad.abs().max()) for p in pl_module.parameters())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    probe = WeightsAndUpdates()
    monitor = GradNormMonitor(log_every_n_steps=1, update_to_weight=True, log_inf_norm=True)
    fit(TinyRegressor(), [monitor, probe], memory_logger, max_steps=3, log_every_n_steps=1)
    metrics = memory_logger.metrics
    for step in range(3):
        old, new = probe.before[step], probe.after[step]
        weight = torch.cat([old["net.2.weight"].flatten(), old["net.2.bias"].flatten()]).double()
        delta = torch.cat([(new[k] - old[k]).flatten() for k in ("net.2.weight", "net.2.bias")]).double()
        expected = float(delta.norm() / weight.norm())
        assert dict(metrics["gradstab/update_to_weight/net.2"])[step] == pytest.approx(expected, rel=1e-4)
    assert metrics["gradstab/grad_max/total"][-1][1] == pytest.approx(probe.grad_max, rel=1e-6)
    ratio = dict(metrics["gradstab/grad_to_weight/net.0"])[0]
    assert 0 < ratio < math.inf


def test_tensorboard_event_files_hold_scalars_histograms_figure_and_layout(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = GradNormMonitor(log_every_n_steps=2, histogram_every_n_steps=2, figure_every_n_steps=2)
    fit(TinyRegressor(), [monitor], logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert "gradstab/grad_norm/total" in tags["scalars"]
    assert "gradstab/grad_norm/net.0" in tags["scalars"]
    assert len(events.Scalars("gradstab/grad_norm/total")) == 6
    assert "gradstab/grad_hist/net.0" in tags["histograms"]
    assert "gradstab/gradient_flow" in tags["images"]
    assert "custom_scalars__config__" in tags["tensors"]
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    assert layout.category[0].title == "Gradient stability"
    titles = [chart.title for chart in layout.category[0].chart]
    assert "total gradient norm and clip threshold" in titles


def test_csv_logger_gets_the_scalars(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path)
    fit(TinyRegressor(), [GradNormMonitor(log_every_n_steps=2)], logger)
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "gradstab/grad_norm/total" in header and "gradstab/grad_to_weight/net.0" in header


def test_a_raising_logger_does_not_stop_training(memory_logger):
    class BrokenLogger(type(memory_logger)):
        def log_metrics(self, metrics, step=None):
            if any(key.startswith("gradstab/") for key in metrics):
                raise OSError("disk full")

    with pytest.warns(UserWarning, match="raised OSError"):
        trainer = fit(TinyRegressor(), [GradNormMonitor(log_every_n_steps=1)], BrokenLogger())
    assert trainer.global_step == 6


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"log_every_n_steps": -1}, "log_every_n_steps"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"histogram_every_n_steps": -5}, "histogram_every_n_steps"),
        ({"figure_every_n_steps": 2.5}, "figure_every_n_steps"),
        ({"norm_type": 0}, "norm_type"),
        ({"norm_type": -2}, "norm_type"),
        ({"group_by": "layer"}, "group_by"),
    ],
)
def test_invalid_arguments_are_rejected_at_construction(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}` must be"):
        GradNormMonitor(**kwargs)


def test_log10_layer_range_is_the_log_of_the_smallest_median_and_largest_layer_norm(memory_logger):
    reference = ReferenceNorms()
    fit(TinyRegressor(depth=4), [GradNormMonitor(log_every_n_steps=2), reference], memory_logger)
    logged = memory_logger.metrics
    for kind, pick in (("layer_min", min), ("layer_max", max)):
        for step, value in logged[f"gradstab/log10_grad_norm/{kind}"]:
            assert value == pytest.approx(math.log10(pick(reference.seen[(step, "")][0].values())), abs=1e-5)
    for step, value in logged["gradstab/log10_grad_norm/total"]:
        assert value == pytest.approx(math.log10(reference.seen[(step, "")][1]), abs=1e-5)


def test_a_deep_model_gets_no_per_layer_scalars_unless_asked(memory_logger):
    deep = TinyRegressor(depth=20)  # 20 Linear layers > 16 groups
    fit(deep, [GradNormMonitor(log_every_n_steps=2)], memory_logger)
    per_layer = [tag for tag in memory_logger.metrics if tag.startswith(("gradstab/grad_norm/net", "gradstab/grad_to"))]
    assert per_layer == [] and "gradstab/log10_grad_norm/layer_median" in memory_logger.metrics

    forced = type(memory_logger)()
    fit(TinyRegressor(depth=20), [GradNormMonitor(log_every_n_steps=2, per_layer_scalars=True)], forced)
    assert "gradstab/grad_norm/net.0" in forced.metrics and "gradstab/grad_to_weight/net.38" in forced.metrics


def _layout_and_images(log_dir: str) -> tuple[list[str], dict[str, list]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = EventAccumulator(log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    titles = [chart.title for chart in layout.category[0].chart]
    images = {tag: events.Images(tag) for tag in events.Tags()["images"]}
    return titles, images


def test_the_layout_lists_only_charts_the_run_fills_and_the_heat_map_is_drawn_from_logged_steps(tmp_path):
    from lightning_gradstab import ExplosionGuard
    from lightning_gradstab.tensorboard import GUARD_CHARTS, HEATMAP_TAG

    monitor_only = TensorBoardLogger(tmp_path, name="monitor")
    fit(TinyRegressor(depth=20), [GradNormMonitor(log_every_n_steps=2, heatmap_every_n_steps=4)], monitor_only)
    titles, images = _layout_and_images(monitor_only.log_dir)
    assert titles == [
        "total gradient norm and clip threshold",
        "log10 gradient norm: total and smallest / median / largest layer",
        "non-finite gradients",
    ]
    # a column per optimizer step 0-5 (not per logged step): drawn at step 4, then at the end with the last step
    assert [image.step for image in images[HEATMAP_TAG]] == [4, 5]
    assert images[HEATMAP_TAG][0].width > 600

    guarded = TensorBoardLogger(tmp_path, name="guarded")
    monitor = GradNormMonitor(log_every_n_steps=2, update_to_weight=True, log_inf_norm=True, heatmap_every_n_steps=None)
    fit(TinyRegressor(depth=3), [monitor, ExplosionGuard()], guarded)
    titles, images = _layout_and_images(guarded.log_dir)
    assert set(GUARD_CHARTS) <= set(titles)
    assert {"per-layer gradient norms", "update-to-weight ratios", "max |grad|"} <= set(titles)
    assert HEATMAP_TAG not in images
