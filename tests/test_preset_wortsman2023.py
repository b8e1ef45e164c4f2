"""The wortsman2023 preset: its LR sensitivity follows the paper's definition, and a tiny two-job sweep writes the
table and the figure (the full 84-job sweep is docs/results/wortsman2023.md, not a test)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from examples.lr_sensitivity import lr_sensitivity, sensitivity_table

REPO = Path(__file__).resolve().parents[1]


def _row(method: str, lr: float, loss: float | None, l0: float = 4.0) -> dict:
    return {"run": f"variant=wortsman2023/{method} optim.optimizer.lr={lr}", "val/loss": loss, "initial_train_loss": l0}


def test_lr_sensitivity_is_the_mean_gap_to_the_best_with_diverged_runs_counted_at_l0():
    rows = [_row("clip1", 1e-3, 2.0), _row("clip1", 1e-2, 1.5), _row("clip1", 1e-1, None),
            _row("guard", 1e-3, 2.0), _row("guard", 1e-2, 1.5), _row("guard", 1e-1, 5.0)]
    arms = {arm["method"]: arm for arm in lr_sensitivity(rows)}
    # E[min(l, l0) - l*] = ((2.0 - 1.5) + 0 + (4.0 - 1.5)) / 3 for both: a loss above l0 counts as l0
    assert arms["clip1"]["sensitivity"] == pytest.approx(1.0)
    assert arms["guard"]["sensitivity"] == pytest.approx(1.0)
    assert arms["guard"]["vs_reference"] == pytest.approx(1.0)
    assert arms["guard"]["worst_excess"] == pytest.approx(1.5 - (1.01 * 1.5 + 0.01))  # the max over the LRs
    assert "| guard | 1.0000 | 1.00 |" in sensitivity_table(list(arms.values()))
    assert math.isinf(lr_sensitivity([_row("none", 1e-3, None, l0=math.inf)])[0]["l0"])


def test_a_tiny_sweep_of_the_preset_writes_the_lr_sensitivity_table_and_figure(tmp_path):
    completed = subprocess.run(
        [sys.executable, "examples/train.py", "-m", "experiment=wortsman2023", "variant=wortsman2023/adagc",
         "optim.optimizer.lr=1e-3,0.3", "model.qk_layernorm=false", "trainer.max_epochs=1",
         "trainer.limit_train_batches=6", "trainer.limit_val_batches=1", "task.max_chars=40000",
         "task.cosine_steps=4", "optim.warmup_steps=2", "gradstab.advisor.observe_steps=10",
         f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    table = (tmp_path / "lr_sensitivity.md").read_text()
    assert "| adagc |" in table and "lr=0.001" in table and "lr=0.3" in table
    assert (tmp_path / "lr_sensitivity.png").stat().st_size > 0
    assert any((tmp_path / "tensorboard_lr_sensitivity").iterdir())
