"""Healthy fine-tunes: a model that has already learned its task, trained on at a lower rate with small batches.

A fine-tune starts where most runs end: the training loss is near zero from the first step, and with a batch of 8
one batch's loss is often ten times the last one's. That is the setting in which a rule on the loss's rise is most
easily fooled (its margin, a share of a loss that is nearly nothing, is within the noise before the noise has been
measured), and the one users run most often. Each task first trains the ReLU MLP (2 x 128) of the corpus on the
digits for 600 steps (Adam, lr 1e-3, batches of 64, a plain loop, no protection), then hands the trained network to
the benchmark, which fine-tunes it with each method on new batches drawn from the same training set:

========================  ===========================================================================================
task                      fine-tune
========================  ===========================================================================================
``finetune_adamw_b8``     AdamW at lr 1e-4 (a tenth of the pretraining rate), batches of 8, 2000 steps
``finetune_sgd_b8``       SGD with momentum 0.9 at lr 1e-3, batches of 8, 2000 steps
``finetune_adamw_b32``    AdamW at lr 1e-4, batches of 32, 1000 steps
========================  ===========================================================================================

The lower rate for a fine-tune is the usual recipe (Howard & Ruder 2018, ULMFiT; Devlin et al. 2019 fine-tune BERT
at 2e-5 to 5e-5 after pretraining at 1e-4); nothing here was chosen by looking at what a protection does. Same
contract as :mod:`benchmarks.healthy_tasks` (``build(seed, steps)`` returns a
:class:`~benchmarks.healthy_tasks.HealthyBuilt`; ``evaluate`` the held-out error rate, lower is better).

Example::

    from benchmarks.healthy_finetune import FINETUNE_TASKS
    built = FINETUNE_TASKS["finetune_adamw_b8"].build(seed=0, steps=20)
    trainer = lightning.pytorch.Trainer(max_steps=built.max_steps, logger=False)
    trainer.fit(built.module, built.train_loader())
    print(built.module.evaluate(built.eval_batches))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.divergence_tasks import Task, _digit_batches, mlp
from benchmarks.healthy_tasks import HealthyBuilt, MetricModule, error_rate

PRETRAIN_STEPS = 600
"""Steps of the plain pretraining loop (Adam, lr 1e-3, batches of 64): held-out error about 0.03."""


def pretrained_mlp(seed: int) -> nn.Module:
    """The corpus's ReLU MLP after :data:`PRETRAIN_STEPS` steps of Adam on the digits (a plain loop, one seed's
    initialisation and batches; the fine-tune's batches come from another generator)."""
    torch.manual_seed(seed)
    net = mlp(128, 2, nn.ReLU)
    batches, _ = _digit_batches(seed, PRETRAIN_STEPS)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(batch["x"]), batch["y"]).backward()
        optimizer.step()
    return net


def _builder(
    optimizer: Callable[[Any], torch.optim.Optimizer], batch_size: int, what: str
) -> Callable[[int, int], HealthyBuilt]:
    def build(seed: int, steps: int) -> HealthyBuilt:
        net = pretrained_mlp(seed)
        train, evals = _digit_batches(seed + 100, steps, batch_size=batch_size)  # new batches, the same data
        return HealthyBuilt(MetricModule(net, "ce", optimizer, error_rate), train, evals)

    build.__doc__ = f"The digit MLP after {PRETRAIN_STEPS} steps of Adam, fine-tuned {what}."
    return build


def _task(name: str, steps: int, optimizer: Callable[[Any], torch.optim.Optimizer], batch: int, what: str) -> Task:
    build = _builder(optimizer, batch, what)
    return Task(name, "healthy", build.__doc__ or "", steps, build)


FINETUNE_TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        _task(
            "finetune_adamw_b8", 2000, lambda p: torch.optim.AdamW(p, lr=1e-4), 8, "with AdamW at lr 1e-4, batches of 8"
        ),
        _task(
            "finetune_sgd_b8",
            2000,
            lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
            8,
            "with SGD (momentum 0.9) at lr 1e-3, batches of 8",
        ),
        _task(
            "finetune_adamw_b32",
            1000,
            lambda p: torch.optim.AdamW(p, lr=1e-4),
            32,
            "with AdamW at lr 1e-4, batches of 32",
        ),
    ]
}

METRICS: dict[str, str] = {name: "error rate" for name in FINETUNE_TASKS}
"""What each task's ``evaluate`` measures (lower is better)."""
