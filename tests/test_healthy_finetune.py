"""Fine-tunes as healthy runs: each task starts from a network that has already learned the digits, known to the
benchmark runner (``--suite finetune``), with the recipe's small batches and lower rate."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from benchmarks import divergence
from benchmarks.healthy_finetune import FINETUNE_TASKS, METRICS


def test_the_runner_knows_every_finetune_task_and_its_metric():
    assert set(METRICS) == set(FINETUNE_TASKS)
    assert all(task.kind == "healthy" for task in FINETUNE_TASKS.values())
    assert set(FINETUNE_TASKS) <= set(divergence.healthy_tasks())
    assert set(METRICS.items()) <= set(divergence.healthy_metrics().items())


def test_a_finetune_starts_from_a_trained_network_with_small_batches_and_keeps_training(tmp_path):
    built = FINETUNE_TASKS["finetune_adamw_b8"].build(seed=0, steps=5)
    assert built.module.evaluate(built.eval_batches) < 0.1  # already trained: chance is 0.9
    assert len(built.train_batches) == 5 and all(len(batch["y"]) == 8 for batch in built.train_batches)
    optimizer = built.module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 1e-4
    trainer = pl.Trainer(
        max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(built.module, built.train_loader())
    assert trainer.global_step == 5
    assert built.module.evaluate(built.eval_batches) < 0.1
