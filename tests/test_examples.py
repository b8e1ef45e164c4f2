"""``examples/train.py`` end to end: single runs, multirun sweeps (local and 2-process DDP), run summaries.

The Hydra jobs run as subprocesses with tiny settings (a few batches of the digits task), exactly as a user
types them; in-process tests cover the divergence stop and the summary it leads to.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.divergence import StopWhenDiverged
from examples.plot_panels import plot_panels
from examples.run_summary import RunSummary
from tests.helpers.subprocess_env import REPO, child_env

TINY = [
    "model.depth=4",
    "model.width=16",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
]


def run_train(
    tmp_path: Path, *overrides: str, timeout: float = 240, returncode: int = 0
) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train.py"), *overrides],
        cwd=tmp_path,
        env=child_env(PL_DISABLE_FORK="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == returncode, (
        f"train.py exited {completed.returncode}:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    )
    return completed


def read_summary(job_dir: Path) -> dict:
    return json.loads((job_dir / "summary.json").read_text())


def event_tags(job_dir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = job_dir.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return accumulator.Tags()


def scalar_tags(job_dir: Path) -> set[str]:
    return set(event_tags(job_dir)["scalars"])


def test_two_job_multirun_writes_both_summaries_and_the_aggregate_table(tmp_path):
    sweep = tmp_path / "sweep"
    # the default config (full suite, Xavier ReLU MLP) at depth 30: the init audit has a finding to report
    completed = run_train(tmp_path, "-m", "seed=0,1", *TINY, "model.depth=30", f"hydra.sweep.dir={sweep}")
    output = completed.stdout + completed.stderr
    assert output.count("GPU available") == 2, "each Lightning line once per job (Hydra's handler, not twice)"
    # one end-of-fit summary per job, advice phrased as overrides, and what the default example is for
    assert output.count("Gradient stability: what this fit found") == 2
    assert "rerun with `model.init=he`" in output and "`gradstab.init_audit.fix=true`" in output
    assert output.count("What this run shows:") == 2

    summaries = [read_summary(sweep / str(job)) for job in (0, 1)]
    for job, summary in enumerate(summaries):
        assert summary["status"] == "finished"
        assert f"seed={job}" in summary["overrides"]
        assert summary["epochs"] == 2 and summary["global_step"] == 8
        assert 0.0 < summary["final"]["train/loss"] < 10.0
        assert 0.0 <= summary["final"]["val/acc"] <= 1.0
        # TensorBoard names each run by what the sweep varies: "0/seed=0", "1/seed=1"
        assert (sweep / str(job) / f"seed={job}" / "gradstab_init_audit.json").exists()
        tags = event_tags(sweep / str(job))
        assert "gradstab/grad_norm/total" in tags["scalars"]
        assert "gradstab/log10_grad_norm/layer_min" in tags["scalars"]
        # 30 layers: per-layer scalars are off by default, the heat map carries the per-layer picture
        assert not any(tag.startswith("gradstab/grad_to_weight/") for tag in tags["scalars"])
        assert "gradstab/gradient_flow_over_time" in tags["images"]
        assert "init.scale" in summary["findings"]
        assert isinstance(summary["guard_actions"], dict)

    table = (sweep / "summary.md").read_text().splitlines()
    assert table[0].startswith("| job | run | status")
    assert [row.split("|")[2].strip() for row in table[2:]] == ["seed=0", "seed=1"]
    with (sweep / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows] == ["finished", "finished"]
    assert float(rows[1]["val/loss"]) == pytest.approx(summaries[1]["final"]["val/loss"], rel=1e-3)
    assert (sweep / "summary.png").stat().st_size > 10_000
    assert not (tmp_path / "lightning_logs").exists()

    titles = plot_panels(sweep / "0", tmp_path / "panels.png")
    assert {
        "total gradient norm and clip threshold",
        "log10 gradient norm: total and smallest / median / largest layer",
        "guard level (0 observe ... 6 stop)",
        "guard LR scale (1 = the scheduled learning rate)",
    } <= set(titles)
    assert (tmp_path / "panels.png").stat().st_size > 10_000


WIDTHLESS = [override for override in TINY if not override.startswith("model.width=")]
"""TINY for tests that set the width themselves (0: a value the builder refuses, past the up-front checks)."""


def test_a_failing_job_is_recorded_the_sweep_goes_on_and_then_exits_non_zero_naming_it(tmp_path):
    sweep = tmp_path / "sweep"
    completed = run_train(
        tmp_path, "-m", "model.width=0,8", "gradstab=off", *WIDTHLESS, f"hydra.sweep.dir={sweep}", returncode=1
    )

    failed, finished = read_summary(sweep / "0"), read_summary(sweep / "1")
    assert failed["status"] == "failed"
    assert "`width` must be an int >= 1, got 0" in failed["error"]  # passes the up-front check, fails at build
    assert finished["status"] == "finished"
    statuses = [line.split("|")[3].strip() for line in (sweep / "summary.md").read_text().splitlines()[2:]]
    assert statuses == ["failed", "finished"]
    output = completed.stdout + completed.stderr
    # the failing job's overrides in full (not "model.activa…") and its error, after the table
    assert "job 0 failed: model.width=0 gradstab=off model.depth=4" in " ".join(output.split())
    assert "1 of 2 jobs failed" in output


def test_single_run_fails_loudly_but_still_leaves_a_summary(tmp_path):
    env = child_env()
    run_dir = tmp_path / "run"
    completed = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train.py"), "model.width=0", "gradstab=off", *WIDTHLESS,
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode != 0
    assert "`width` must be an int >= 1, got 0" in completed.stderr
    assert read_summary(run_dir)["status"] == "failed"


@pytest.mark.ddp
def test_multirun_of_ddp_cpu_jobs_writes_one_summary_per_job_from_rank_zero(tmp_path):
    sweep = tmp_path / "sweep"
    completed = run_train(
        tmp_path, "-m", "trainer=ddp_cpu", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}", timeout=300
    )

    job_dirs = sorted(path.parent.name for path in sweep.rglob(".hydra"))
    assert job_dirs == ["0", "1"], "each job runs once: no rank re-launched the sweep"
    assert completed.stdout.count("Launching 2 jobs locally") + completed.stderr.count("Launching 2 jobs") == 1
    for job in ("0", "1"):
        summary = read_summary(sweep / job)
        assert summary["status"] == "finished"
        assert "trainer=ddp_cpu" in summary["overrides"]
        # 2 ranks x 4 batches of 32 per epoch: each rank takes 4 steps per epoch
        assert summary["global_step"] == 8
        assert len(list((sweep / job).rglob("summary.json"))) == 1
        assert len(list((sweep / job).rglob("gradstab_init_audit.json"))) == 1  # the full suite ran
        assert "gradstab/grad_norm/total" in scalar_tags(sweep / job)
    assert len((sweep / "summary.md").read_text().splitlines()) == 4
    assert not (tmp_path / "lightning_logs").exists() and not (tmp_path / "outputs").exists()


class _NaNAfter(pl.LightningModule):
    """A linear regression whose loss turns NaN from optimizer step ``nan_from_step`` on."""

    def __init__(self, nan_from_step: int) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.nan_from_step = nan_from_step

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.layer(inputs), targets)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss * float("nan") if self.global_step >= self.nan_from_step else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(400, 4, generator=generator), torch.randn(400, 1)), batch_size=4)


def test_a_run_whose_loss_stays_nonfinite_is_stopped_and_summarised_as_diverged(tmp_path):
    torch.manual_seed(0)
    stopper = StopWhenDiverged(patience=5)
    recorder = RunSummary(tmp_path, {"name": "nan"})
    trainer = pl.Trainer(
        max_epochs=3, callbacks=[stopper, recorder], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(_NaNAfter(nan_from_step=3))

    assert stopper.diverged
    assert stopper.diverged_at_step == 8  # steps 3..7 are the five non-finite ones
    assert trainer.global_step == 8, "training stopped instead of running 300 steps"
    summary = read_summary(tmp_path)
    assert (summary["status"], summary["diverged"], summary["diverged_at_step"]) == ("diverged", True, 8)


def test_a_single_nonfinite_loss_is_not_divergence():
    stopper = StopWhenDiverged(patience=2)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False)
    for loss in (float("nan"), 1.0, float("nan"), 1.0):
        stopper.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, 0)
    assert not stopper.diverged and not trainer.should_stop


def test_divergence_state_survives_a_checkpoint_round_trip():
    stopper = StopWhenDiverged(patience=3)
    stopper.nonfinite_streak, stopper.diverged, stopper.diverged_at_step = 2, True, 17
    restored = StopWhenDiverged(patience=3)
    restored.load_state_dict(stopper.state_dict())
    assert (restored.nonfinite_streak, restored.diverged, restored.diverged_at_step) == (2, True, 17)


@pytest.mark.parametrize("patience", [0, -1, 1.5, True])
def test_stop_when_diverged_rejects_a_patience_that_is_not_a_positive_int(patience):
    with pytest.raises(ValueError, match=r"`patience` must be an int >= 1"):
        StopWhenDiverged(patience=patience)
