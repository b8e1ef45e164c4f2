"""float64 and complex parameters are measured in their own precision and guarded like float32 ones.

The reference everywhere is the slow, obvious float64 computation: per parameter ``sum |g|^2`` over the real
and imaginary parts, one tensor at a time.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradstab import ExplosionGuard, GradNormMonitor
from lightning_gradstab.stats import ParameterLayout, compute_gradient_stats, layout_norms
from tests.helpers.trainers import quiet_trainer

torch.set_num_threads(1)


def reference_sq_norm(tensor: torch.Tensor) -> float:
    """``sum |z|^2`` in float64, one tensor at a time."""
    real = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    return float(real.detach().double().square().sum())


def reference_norm(tensor: torch.Tensor, ord: float) -> float:
    modulus = tensor.detach().abs().double().flatten()  # |z| for complex, |x| for real
    return float(modulus.max()) if math.isinf(ord) else float(modulus.pow(ord).sum() ** (1 / ord))


def _backward(model: nn.Module, dtype: torch.dtype, scale: float = 1.0) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=dtype)
    out = model(x)
    loss = out.abs().square().sum() if out.is_complex() else out.square().sum()
    (loss * scale).backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.complex128])
def test_float64_and_complex_gradient_norms_match_the_float64_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    _backward(model, dtype)
    stats = compute_gradient_stats(ParameterLayout.from_module(model))

    grads = [p.grad for p in model.parameters()]
    expected_sq = [reference_sq_norm(g) for g in grads]
    precision = 1e-12 if dtype in (torch.float64, torch.complex128) else 1e-6
    assert stats.param_sq_norms.tolist() == pytest.approx(expected_sq, rel=precision)
    assert float(stats.total_norm) == pytest.approx(math.sqrt(sum(expected_sq)), rel=precision)
    assert float(stats.nonfinite_count) == 0
    for ord in (1.0, math.inf):  # complex: norms of the modulus |z|, not of (re, im) separately
        assert stats.param_norms(ord).tolist() == pytest.approx([reference_norm(g, ord) for g in grads], rel=precision)


def test_float64_statistics_keep_float64_range_where_float32_would_overflow() -> None:
    model = nn.Linear(4, 3).double()
    _backward(model, torch.float64, scale=1e30)  # squared norms ~1e60: inf in float32, ordinary in float64
    stats = compute_gradient_stats(ParameterLayout.from_module(model))
    assert stats.param_sq_norms.dtype == torch.float64
    expected = math.sqrt(sum(reference_sq_norm(p.grad) for p in model.parameters()))
    assert float(stats.total_norm) == pytest.approx(expected, rel=1e-12)
    assert float(stats.nonfinite_count) == 0


def test_a_layout_mixing_float32_bfloat16_and_float64_is_measured_in_float64() -> None:
    model = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3).to(torch.bfloat16), nn.Linear(3, 3).double()])
    for layer in model:
        layer(torch.randn(2, 3, dtype=layer.weight.dtype)).float().square().sum().backward()
    layout = ParameterLayout.from_module(model)
    stats = compute_gradient_stats(layout)
    assert layout.stats_dtype == torch.float64
    expected = [reference_sq_norm(p.grad) for p in model.parameters()]
    assert stats.param_sq_norms.tolist() == pytest.approx(expected, rel=1e-5)  # bf16 grads: float32 accumulation
    assert stats.weight_norms().tolist() == pytest.approx([reference_sq_norm(p) ** 0.5 for p in model.parameters()])
    deltas = [p.detach() * 0.5 for p in layout.parameters]  # any per-parameter tensors, e.g. optimizer updates
    assert layout_norms(layout, deltas, "half").tolist() == pytest.approx(
        [0.5 * reference_sq_norm(p) ** 0.5 for p in model.parameters()], rel=1e-5
    )


def test_float32_models_keep_float32_statistics() -> None:
    model = nn.Linear(4, 3)
    _backward(model, torch.float32)
    assert compute_gradient_stats(ParameterLayout.from_module(model)).param_sq_norms.dtype == torch.float32


class _Regression(pl.LightningModule):
    """A 4-16-1 MLP in ``dtype`` (real or complex) with Adam; a NaN loss at ``nan_step``."""

    def __init__(self, dtype: torch.dtype, nan_step: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
        self.nan_step = nan_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = (self.net(x) - y).abs().square().mean()
        return loss * float("nan") if self.global_step == self.nan_step else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters()]


class _ReferenceNorms(Callback):
    """Before every optimizer step: the naive float64 total norm and the weights (to see what a step changed)."""

    def __init__(self) -> None:
        self.total_norms: list[float] = []
        self.weights_before: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        total = sum(reference_sq_norm(p.grad) for p in pl_module.parameters() if p.grad is not None)
        self.total_norms.append(math.sqrt(total))
        self.weights_before.append(pl_module.weights())


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_float64_and_complex_models_train_measured_and_guarded(dtype: torch.dtype, memory_logger: Any) -> None:
    steps, nan_step = 40, 30  # past the guard's 25 warm-up steps
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps * 8, 4, generator=generator).to(dtype)
    y = x.sum(-1, keepdim=True).sin()
    model = _Regression(dtype, nan_step)
    reference = _ReferenceNorms()
    guard = ExplosionGuard(console_summary=False)
    trainer = quiet_trainer(
        max_steps=steps,
        logger=memory_logger,
        log_every_n_steps=1,
        callbacks=[reference, GradNormMonitor(update_to_weight=True), guard],
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))

    assert trainer.global_step == steps
    logged = [value for _, value in memory_logger.metrics["gradstab/grad_norm/total"]]
    assert len(logged) == steps
    finite = [i for i in range(steps) if i != nan_step]
    assert [logged[i] for i in finite] == pytest.approx([reference.total_norms[i] for i in finite], rel=1e-5)
    assert math.isnan(logged[nan_step])
    # the NaN step was skipped: the weights after it are the weights before it, and they stay finite
    after_nan = reference.weights_before[nan_step + 1]
    assert all(torch.equal(a, b) for a, b in zip(after_nan, reference.weights_before[nan_step], strict=True))
    assert all(torch.isfinite(torch.view_as_real(p) if p.is_complex() else p).all() for p in model.weights())
    assert guard.summary()["optimizers"]["0"]["counts"].get("skip", 0) >= 1
    # update-to-weight ratios are measured in the parameters' own dtype too: ||w_after - w_before|| / ||w_before||
    update_ratios = dict(memory_logger.metrics["gradstab/update_to_weight/net.0"])
    for step in (1, 10, 20):
        before, after = reference.weights_before[step][:2], reference.weights_before[step + 1][:2]  # net.0's
        delta_norm = math.sqrt(sum(reference_sq_norm(a - b) for a, b in zip(after, before, strict=True)))
        expected = delta_norm / math.sqrt(sum(reference_sq_norm(w) for w in before))
        assert update_ratios[step] == pytest.approx(expected, rel=1e-6)
