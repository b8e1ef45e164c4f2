"""What the guard did is one typed record (GuardSummary): the end-of-fit table and the suite's summary read it,
and its plain form is exactly ``ExplosionGuard.summary()`` and the summary file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lightning_gradstab import ExplosionGuard
from lightning_gradstab.console import render_text
from lightning_gradstab.fit_summary import fit_summary
from lightning_gradstab.guard.summary import GuardSummary
from tests.fixtures.old_guard_checkpoints import SpikyRegression, loader
from tests.helpers.trainers import quiet_trainer


class _SpikyRegressionAtAHighRate(SpikyRegression):
    """The spiky regression at 20x its SGD rate: its loss rises for real, so the record has divergences and a
    back-off (its three corrupted batches alone are loss spikes, not a divergence)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_the_summary_file_the_summary_and_the_suite_s_record_are_one_guard_summary(tmp_path: Path) -> None:
    guard = ExplosionGuard()
    torch.manual_seed(0)
    module = _SpikyRegressionAtAHighRate()
    quiet_trainer(max_steps=60, callbacks=[guard], default_root_dir=tmp_path).fit(module, loader())
    written = json.loads((tmp_path / "gradstab_guard_summary.json").read_text())
    assert written == guard.summary()
    (record,) = guard.summary_contribution().guard_summaries
    assert isinstance(record, GuardSummary) and record.to_mapping() == written
    assert GuardSummary.from_mapping(written) == record
    account = record.optimizers[0]
    assert account.counts["divergence"] >= 1 and account.worst_spikes and account.final_rung == "lr_backoff"
    # the typed record and its plain form say the same in the end-of-fit summary
    typed, plain = (render_text(*fit_summary([], [form]), terminal=False, width=120) for form in (record, written))
    assert typed == plain and "divergence=" in typed
