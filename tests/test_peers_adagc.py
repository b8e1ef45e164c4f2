"""The ``adagc`` peer is AdaGC (Wang et al., arXiv 2502.11034): per-tensor clipping against lambda_rel times an EMA
of each tensor's own clipped norms, after a warm-up of global clipping. Checked against a direct float64
transcription of the paper's formulas over a few steps, with a spike in one tensor."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks.peers import AdaGCClipping, resolve_method


def reference_adagc(grad_steps, beta=0.98, lam_rel=1.05, lam_abs=1.0, warmup=100, eps=1e-8):
    """The paper's Algorithm 1 in float64 on Python floats: returns the clipped gradients of every step."""
    gamma = [math.inf] * len(grad_steps[0])
    out = []
    for t, grads in enumerate(grad_steps):
        norms = [math.sqrt(sum(x * x for x in g)) for g in grads]
        if t < warmup:
            total = math.sqrt(sum(n * n for n in norms))
            h = [min(lam_abs / (total + eps), 1.0)] * len(grads)
            gamma = [min(gm, hi * n) for gm, hi, n in zip(gamma, h, norms, strict=True)]
        else:
            h = [min(lam_rel * gm / (n + eps), 1.0) for gm, n in zip(gamma, norms, strict=True)]
            gamma = [beta * gm + (1 - beta) * hi * n for gm, hi, n in zip(gamma, h, norms, strict=True)]
        out.append([[hi * x for x in g] for hi, g in zip(h, grads, strict=True)])
    return out


def _steps():
    generator = torch.Generator().manual_seed(0)
    steps = []
    for t in range(8):
        a = (torch.randn(6, generator=generator) * (2.0 if t < 2 else 0.3)).tolist()  # warm-up above lambda_abs
        b = (torch.randn(4, generator=generator) * 0.1).tolist()
        if t == 5:
            b = [x * 50 for x in b]  # a spike in tensor b only: AdaGC cuts b and leaves a alone
        steps.append([a, b])
    return steps


def test_the_peer_matches_the_papers_formulas_step_by_step_with_a_spike_in_one_tensor():
    steps = _steps()
    expected = reference_adagc(steps, warmup=3)
    callback = AdaGCClipping(warmup_steps=3)
    a, b = nn.Parameter(torch.zeros(6, dtype=torch.float64)), nn.Parameter(torch.zeros(4, dtype=torch.float64))
    optimizer = torch.optim.SGD([a, b], lr=0.1)
    trainer = SimpleNamespace(optimizers=[optimizer])
    for t, (ga, gb) in enumerate(steps):
        a.grad, b.grad = torch.tensor(ga, dtype=torch.float64), torch.tensor(gb, dtype=torch.float64)
        callback.on_before_optimizer_step(trainer, None, optimizer)
        torch.testing.assert_close(a.grad, torch.tensor(expected[t][0], dtype=torch.float64), rtol=1e-6, atol=0)
        torch.testing.assert_close(b.grad, torch.tensor(expected[t][1], dtype=torch.float64), rtol=1e-6, atol=0)
    # the spike in b is cut by two orders of magnitude; a, whose norm moves only with the noise, far less
    clipped_at_spike = math.sqrt(sum(x * x for x in expected[5][1])) / math.sqrt(sum(x * x for x in steps[5][1]))
    kept_of_a = math.sqrt(sum(x * x for x in expected[5][0])) / math.sqrt(sum(x * x for x in steps[5][0]))
    assert clipped_at_spike < 0.01 < 0.5 < kept_of_a


def test_defaults_are_the_papers_and_resolve_by_name():
    callback = resolve_method("adagc")().callbacks[0]
    assert isinstance(callback, AdaGCClipping)
    assert callback.settings == {
        "beta": 0.98, "relative_threshold": 1.05, "absolute_threshold": 1.0, "warmup_steps": 100
    }


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(24, 4, generator=generator)  # 3 batches: the checkpoint at step 3 ends an epoch
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _fit(callback: AdaGCClipping, steps: int, ckpt_path: str | None = None, root: str = ".") -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, enable_checkpointing=False)
    trainer.fit(_Tiny(), ckpt_path=ckpt_path)
    return trainer


def test_state_survives_a_checkpoint_round_trip(tmp_path):
    straight = AdaGCClipping(warmup_steps=2)
    _fit(straight, 6, root=str(tmp_path))
    first = AdaGCClipping(warmup_steps=2)
    trainer = _fit(first, 3, root=str(tmp_path))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)["callbacks"]["AdaGCClipping"]
    torch.testing.assert_close(saved[0]["ema_norms"], first.clippers[0].ema_norms)
    resumed = AdaGCClipping(warmup_steps=2)
    _fit(resumed, 6, ckpt_path=str(tmp_path / "mid.ckpt"), root=str(tmp_path))
    assert resumed.clippers[0].step == straight.clippers[0].step == 6
    # the resumed run continues the EMA (Lightning's resumed data and float order differ in the last digits)
    torch.testing.assert_close(resumed.clippers[0].ema_norms, straight.clippers[0].ema_norms, rtol=1e-2, atol=0)
