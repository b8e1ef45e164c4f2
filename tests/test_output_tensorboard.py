"""What TensorBoard shows reads at a glance: one chart per quantity and per optimizer, tags named alike by every
callback, the effective learning rate beside LearningRateMonitor's, a heat map with a column per optimizer step
(its last included) and a legend for zero, NaN and Inf, a PNG where no logger takes images, and findings as a
short-column table."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_gradstab import ExplosionGuard, GradNormMonitor
from lightning_gradstab.tensorboard import (
    HEATMAP_COLOURS,
    HeatmapBuffer,
    chart_tags,
    gradient_heatmap_figure,
)
from tests.helpers.models import TinyRegressor, TwoOptimizerModule
from tests.helpers.trainers import quiet_trainer


def _events(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir, size_guidance={"tensors": 0, "scalars": 0, "images": 0})
    events.Reload()
    return events


def test_two_optimizers_get_a_chart_each_and_the_same_opt_scope_from_monitor_and_guard(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    trainer = quiet_trainer(max_steps=8, logger=logger, log_every_n_steps=2,
                            callbacks=[GradNormMonitor(), ExplosionGuard(), LearningRateMonitor()])
    trainer.fit(TwoOptimizerModule())
    logger.experiment.flush()
    events = _events(logger.log_dir)
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    categories = {category.title: category for category in layout.category}
    assert set(categories) == {"Gradient stability: optimizer 0", "Gradient stability: optimizer 1"}
    charts = categories["Gradient stability: optimizer 1"].chart
    level_chart = next(chart for chart in charts if chart.title.startswith("guard level"))
    assert list(level_chart.multiline.tag) == [r"gradstab/opt1/level$"]  # one optimizer, one quantity
    scalars = set(events.Tags()["scalars"])
    for index in (0, 1):
        assert {f"gradstab/opt{index}/level", f"gradstab/grad_norm/opt{index}/total"} <= scalars
    assert "gradstab/level" not in scalars  # no unscoped optimizer 0 beside a scoped optimizer 1
    assert {"lr-Adam", "lr-Adam-1", "lr-Adam/gradstab_effective", "lr-Adam-1/gradstab_effective"} <= scalars
    effective = {event.step: event.value for event in events.Scalars("lr-Adam-1/gradstab_effective")}
    scale = {event.step: event.value for event in events.Scalars("gradstab/opt1/lr_scale")}
    assert effective and all(value == pytest.approx(1e-3 * scale[step]) for step, value in effective.items())


def test_chart_patterns_match_only_their_optimizer_and_quantity():
    import re

    (pattern,) = chart_tags("guard level (0 observe ... 6 stop)", 0)
    assert re.match(pattern, "gradstab/opt0/level") and not re.match(pattern, "gradstab/opt1/level")
    (layers,) = chart_tags("per-layer gradient norms")
    assert re.match(layers, "gradstab/grad_norm/net.0") and not re.match(layers, "gradstab/grad_norm/total")


def test_the_heat_map_has_a_column_per_optimizer_step_whatever_log_every_n_steps_and_its_last_step(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    monitor = GradNormMonitor(heatmap_every_n_steps=100)
    trainer = quiet_trainer(max_steps=7, logger=logger, log_every_n_steps=50, callbacks=[monitor])
    trainer.fit(TinyRegressor(depth=3))
    logger.experiment.flush()
    images = _events(logger.log_dir).Images("gradstab/gradient_flow_over_time")
    assert [image.step for image in images] == [6]  # drawn once, at the end, with the last step


def test_the_buffer_is_bounded_keeps_the_whole_run_and_always_the_newest_step():
    buffer = HeatmapBuffer(("a", "b"), capacity=8)
    for step in range(37):
        buffer.add(step, torch.tensor([float(step), 0.0]))
    steps, columns = buffer.columns()
    assert len(steps) <= 9 and steps[0] == 0 and steps[-1] == 36  # the capacity, plus the newest step
    assert steps == sorted(steps)
    assert all(column == [float(step), 0.0] for step, column in zip(steps, columns, strict=True))


def test_the_heat_map_legend_names_zero_nan_and_inf_in_their_own_colours():
    figure = gradient_heatmap_figure([0, 1, 2], ["net.0", "net.2"], [[0.0, 1.0], [math.nan, 1.0], [math.inf, 0.1]])
    legend = figure.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["zero gradient", "NaN", "Inf"]
    assert len(set(HEATMAP_COLOURS.values())) == 3


def test_without_a_tensorboard_logger_the_heat_map_is_a_png_beside_the_logs_said_once(tmp_path):
    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(max_steps=9, logger=logger, callbacks=[GradNormMonitor(heatmap_every_n_steps=3)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyRegressor(depth=3))
    said = [w for w in caught if "gradient heat map" in str(w.message)]
    png = tmp_path / "lightning_logs" / "version_0" / "gradstab_gradient_flow_over_time.png"
    assert len(said) == 1 and str(png) in str(said[0].message)
    assert png.read_bytes().startswith(b"\x89PNG")
