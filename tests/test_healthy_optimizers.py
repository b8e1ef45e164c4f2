"""torch's adaptive optimizers at their defaults as healthy runs: one task per optimizer and model, each built with
every setting at torch's default, known to the benchmark runner (``--suite optimizers``), and trainable."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from benchmarks import divergence
from benchmarks.healthy_optimizers import METRICS, OPTIMIZER_TASKS, OPTIMIZERS
from lightning_gradstab.callbacks._optimizers import is_scale_invariant


def test_every_adaptive_optimizer_of_torch_has_a_task_on_both_models_and_the_runner_knows_them():
    assert {"adam", "adamw", "rmsprop", "adagrad", "adadelta"} <= set(OPTIMIZERS)
    assert set(OPTIMIZER_TASKS) == {f"{net}_{name}" for net in ("mlp", "cnn") for name in OPTIMIZERS}
    assert set(METRICS) == set(OPTIMIZER_TASKS)
    assert all(task.kind == "healthy" for task in OPTIMIZER_TASKS.values())
    assert set(OPTIMIZER_TASKS) <= set(divergence.healthy_tasks())
    assert set(METRICS.items()) <= set(divergence.healthy_metrics().items())


@pytest.mark.parametrize("name", ["mlp_rmsprop", "cnn_adagrad"])
def test_a_task_uses_the_optimizer_with_every_setting_at_torchs_default_and_trains(name, tmp_path):
    built = OPTIMIZER_TASKS[name].build(seed=0, steps=3)
    optimizer = built.module.configure_optimizers()
    reference = type(optimizer)(built.module.parameters())  # the class's own defaults
    assert optimizer.defaults == reference.defaults and is_scale_invariant(optimizer)
    before = built.module.evaluate(built.eval_batches)
    trainer = pl.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(built.module, built.train_loader())
    after = built.module.evaluate(built.eval_batches)
    assert 0.0 <= after <= 1.0 and 0.0 <= before <= 1.0
    assert all(torch.isfinite(p).all() for p in built.module.parameters())
