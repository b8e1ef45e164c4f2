"""Healthy runs under every adaptive optimizer torch ships, each at its own default settings.

A user who writes ``torch.optim.RMSprop(model.parameters())`` gets lr 0.01 and alpha 0.99; ``Adagrad`` lr 0.01;
``Adadelta`` lr 1.0; ``Adafactor`` its relative step. The guard treats all of them as scale-invariant (Adam-family):
they get the ``max_norm="auto"`` ceiling of 1.0 and the relative-update ceiling. This set checks what that does to
a healthy run of each, on two models the divergence benchmark already uses on the digits (the ReLU MLP, 2 x 128, and
the plain CNN), 400 steps of 64 (~18 epochs), the same data and batches for every optimizer. Nothing here was
chosen by looking at what a protection does: the settings are torch's defaults.

Same contract as :mod:`benchmarks.healthy_tasks` (``build(seed, steps)`` returns a
:class:`~benchmarks.healthy_tasks.HealthyBuilt`; ``evaluate`` the held-out error rate, lower is better).

Example::

    from benchmarks.healthy_optimizers import OPTIMIZER_TASKS
    built = OPTIMIZER_TASKS["cnn_rmsprop"].build(seed=0, steps=20)
    trainer = lightning.pytorch.Trainer(max_steps=built.max_steps, logger=False)
    trainer.fit(built.module, built.train_loader())
    print(built.module.evaluate(built.eval_batches))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.divergence_tasks import Task, _digit_batches, cnn, mlp
from benchmarks.healthy_tasks import HealthyBuilt, MetricModule, error_rate

STEPS = 400

OPTIMIZERS: dict[str, str] = {
    name.lower(): name
    for name in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad", "RMSprop", "Adadelta", "Adafactor")
    if hasattr(torch.optim, name)
}
"""torch's adaptive optimizers (those the guard reads as scale-invariant), by task suffix."""


def _default_optimizer(name: str) -> Callable[[Any], torch.optim.Optimizer]:
    optimizer_class = getattr(torch.optim, name)
    return lambda params: optimizer_class(params)  # every setting at torch's default


def _builder(net: str, optimizer: str) -> Callable[[int, int], HealthyBuilt]:
    def build(seed: int, steps: int) -> HealthyBuilt:
        image = net == "cnn"
        train, evals = _digit_batches(seed, steps, image=image)
        model = cnn() if image else mlp(128, 2, nn.ReLU)
        return HealthyBuilt(MetricModule(model, "ce", _default_optimizer(optimizer), error_rate), train, evals)

    what = "the plain CNN" if net == "cnn" else "a ReLU MLP (2 x 128)"
    build.__doc__ = f"{what} on digits under torch.optim.{optimizer} with every setting at its default."
    return build


OPTIMIZER_TASKS: dict[str, Task] = {
    f"{net}_{suffix}": Task(f"{net}_{suffix}", "healthy", _builder(net, name).__doc__ or "", STEPS, _builder(net, name))
    for net in ("mlp", "cnn")
    for suffix, name in OPTIMIZERS.items()
}

METRICS: dict[str, str] = {name: "error rate" for name in OPTIMIZER_TASKS}
"""What each task's ``evaluate`` measures (lower is better)."""
