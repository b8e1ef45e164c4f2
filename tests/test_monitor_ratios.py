"""GradNormMonitor's gradient-to-weight ratio against a float64 reference: ||grad|| / ||w|| of each layer."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradstab import GradNormMonitor
from tests.helpers.models import TinyRegressor
from tests.helpers.trainers import quiet_trainer


class Float64Ratios(Callback):
    """||g|| / ||w|| per layer in float64, at the moment the monitor measures (before the optimizer step)."""

    def __init__(self) -> None:
        self.ratios: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        layers: dict[str, tuple[float, float]] = {}
        for name, parameter in pl_module.named_parameters():
            layer = name.rsplit(".", 1)[0]
            grad_sq, weight_sq = layers.get(layer, (0.0, 0.0))
            layers[layer] = (
                grad_sq + float(parameter.grad.double().pow(2).sum()),
                weight_sq + float(parameter.detach().double().pow(2).sum()),
            )
        self.ratios.append({layer: (g / w) ** 0.5 for layer, (g, w) in layers.items()})


def test_gradient_to_weight_ratio_of_every_layer_equals_the_float64_reference(memory_logger):
    torch.manual_seed(0)
    reference = Float64Ratios()
    model = TinyRegressor(width=16, depth=3)
    with torch.no_grad():  # weight norms far from 1, so ||g||/||w|| and ||g||/||w||^2 differ by far
        model.net[0].weight.mul_(4.0)
        model.net[2].weight.mul_(0.1)
    trainer = quiet_trainer(
        max_steps=3,
        logger=memory_logger,
        log_every_n_steps=1,
        callbacks=[GradNormMonitor(log_every_n_steps=1), reference],
    )
    trainer.fit(model)
    for layer in ("net.0", "net.2", "net.4"):
        logged = dict(memory_logger.metrics[f"gradstab/grad_to_weight/{layer}"])
        assert sorted(logged) == [0, 1, 2]
        for step, expected in enumerate(r[layer] for r in reference.ratios):
            assert logged[step] == pytest.approx(expected, rel=1e-4)
