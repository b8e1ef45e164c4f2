"""2-process CPU DDP job: InitAudit(fix=True) on different per-rank batches must give identical weights."""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradstab import ArchitectureAdvisor, InitAudit
from tests.helpers.models import DigitsClassifier, digits, mlp
from tests.helpers.trainers import quiet_trainer


class RankData(DigitsClassifier):
    def train_dataloader(self):
        # a different batch on every rank: each rank's probe sees different activations
        x, y = digits()
        rows = torch.arange(self.global_rank, len(x), 2)
        return DataLoader(TensorDataset(x[rows], y[rows]), batch_size=32)


class WeightsAfterAudit(Callback):
    def __init__(self):
        self.checksums = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.checksums is None:
            self.checksums = [p.detach().double().abs().sum().item() for p in pl_module.parameters()]


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    audit, recorder, advisor = InitAudit(fix=True, seed=3), WeightsAfterAudit(), ArchitectureAdvisor(observe_steps=10)
    trainer = quiet_trainer(
        devices=2, strategy="ddp", max_steps=12, default_root_dir=out_dir, callbacks=[audit, recorder, advisor]
    )
    model = RankData(mlp(30, 64, init="xavier"))
    trainer.fit(model)
    (out_dir / f"rank{trainer.global_rank}.json").write_text(
        json.dumps({
            "fixed": audit.fixed_modules,
            "checksums_after_audit": recorder.checksums,
            "final": [p.detach().double().abs().sum().item() for p in model.parameters()],
            "advisor_codes": sorted(advisor.report.codes),
        })
    )
