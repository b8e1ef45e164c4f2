"""Sharded gradients (FSDP2 DTensors on CPU, Lightning FSDP on GPU): one all-reduce gives the global norms."""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers.subprocess_env import REPO, child_env

pytestmark = [pytest.mark.ddp, pytest.mark.timeout(240)]


def test_fsdp2_dtensor_shards_give_the_unsharded_norms_on_every_rank(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "tests/scripts/sharded_norms.py"), str(tmp_path)],
        env=child_env(TEST_PORT="29531"),
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    reference = json.loads((tmp_path / "reference.json").read_text())
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results["fsdp2"] == pytest.approx(reference, rel=1e-5), rank


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy needs a CUDA device")
def test_lightning_fsdp_strategy_logs_the_global_norm(tmp_path, memory_logger):
    import lightning.pytorch as pl

    from lightning_gradstab import GradNormMonitor
    from tests.helpers.models import TinyRegressor

    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        strategy="fsdp",
        max_steps=3,
        logger=memory_logger,
        callbacks=[monitor := GradNormMonitor(log_every_n_steps=1, self_check=True)],
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyRegressor())
    totals = memory_logger.metrics["gradstab/grad_norm/total"]
    assert len(totals) == 3 and all(0 < value < float("inf") for _, value in totals)
    suite, gathered = monitor.self_check_results[0]  # FSDP1 unsharded with its gradients, summed independently
    assert suite == pytest.approx(gathered, rel=1e-5)
