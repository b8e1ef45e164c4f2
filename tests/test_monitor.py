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
from tests.models import TinyRegressor, TwoOptimizerModule


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


def fit(model, callbacks, logger, **trainer_kwargs) -> pl.Trainer:
    torch.manual_seed(0)
    options = dict(
        max_steps=6,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=2,
    )
    options.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **options)
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
