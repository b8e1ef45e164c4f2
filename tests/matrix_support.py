"""Shared pieces of the compatibility and fault matrix: one configurable tiny model, the suite, one runner.

A *cell* is a :class:`Cell` (model options + trainer options). :func:`run_cell` trains it once with the
given callbacks and returns what a test compares: the final weights, the logged scalars and a float64
reference of every gradient norm the suite should have logged. Runs are seeded, single-threaded and
fp32 on the CPU unless the cell says otherwise, so two runs of the same cell are bit-identical unless a
callback changed something.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradstab import ArchitectureAdvisor, ExplosionGuard, GradNormMonitor, InitAudit
from tests.conftest import MemoryLogger
from tests.helpers.trainers import quiet_trainer

FEATURES = 8
VOCABULARY = 12
BATCH_SIZE = 8
TRAIN_BATCHES = 4  # per epoch: a per-epoch scheduler steps twice in an 8-step cell


def matrix_data(batches: int = TRAIN_BATCHES, seed: int = 0) -> DataLoader:
    """Batches ``(features, token, target)``: a linear target of the features plus a per-token offset.

    The target is scaled to 0.2 so the healthy gradient norm stays below 1 from the first step: the cells train
    with Adam, which the guard clips at 1.0 by default (``max_norm="auto"``), and every cell here is a healthy run
    that the suite must leave bit-identical (the ceiling has its own tests in ``test_guard.py``).
    """
    generator = torch.Generator().manual_seed(seed)
    n = batches * BATCH_SIZE
    features = torch.randn(n, FEATURES, generator=generator)
    tokens = torch.randint(0, VOCABULARY, (n,), generator=generator)
    offsets = torch.randn(VOCABULARY, generator=generator)
    target = 0.2 * (features @ torch.randn(FEATURES, 1, generator=generator) + offsets[tokens, None])
    return DataLoader(TensorDataset(features, tokens, target), batch_size=BATCH_SIZE, shuffle=False)


class FixedProjection(nn.Module):
    """A submodule with a buffer and no parameters at all (nothing for the optimizer or the statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("projection", torch.eye(FEATURES) * 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.projection


class MatrixModel(pl.LightningModule):
    """A ~450-parameter regressor whose options switch on one Lightning feature each.

    Args:
        manual: manual optimization (``training_step`` calls ``manual_backward`` and ``opt.step()``).
        two_optimizers: GAN-style: the body and the head have their own Adam, both stepped every batch
            (manual optimization only: Lightning 2 supports several optimizers only there).
        frozen: the first layer does not train (``requires_grad=False``, not in the optimizer).
        tied: the third linear layer reuses the second one's weight.
        sparse_embedding: add a token embedding with sparse gradients (SGD accepts them).
        parameterless: route the input through :class:`FixedProjection` (buffers, no parameters).
        scheduler: ``None``, ``"step"`` (StepLR stepping every optimizer step) or ``"epoch"``.
        compile_backend: ``torch.compile`` the body and the head with this backend (``None``: eager).
        log_in_training_step: call ``self.log`` in ``training_step``; dynamo cannot trace it (torch 2.13,
            Lightning 2.6), so a cell that compiles the whole LightningModule turns it off.
        init_gain: multiply every linear weight by this after the default init (large: an ``init.scale``
            finding for :class:`~lightning_gradstab.InitAudit`).
        fault: ``{batch: kind}`` with kind ``"nan_input"``, ``"nan_loss"`` or ``"inf_loss"``; ``batch`` counts
            the run's training batches from 0 across epochs (``fit_loop.total_batch_idx``), so a probe that
            runs ``training_step`` on the same batch sees the same fault.
    """

    def __init__(
        self,
        manual: bool = False,
        two_optimizers: bool = False,
        frozen: bool = False,
        tied: bool = False,
        sparse_embedding: bool = False,
        parameterless: bool = False,
        scheduler: str | None = None,
        compile_backend: str | None = None,
        log_in_training_step: bool = True,
        init_gain: float = 1.0,
        fault: dict[int, str] | None = None,
    ) -> None:
        super().__init__()
        if two_optimizers and not manual:
            raise ValueError("`two_optimizers` needs `manual=True` (Lightning 2 automatic optimization has one)")
        self.automatic_optimization = not manual
        self.two_optimizers = two_optimizers
        self.scheduler = scheduler
        self.fault = dict(fault or {})
        self.log_in_training_step = log_in_training_step
        self.fixed = FixedProjection() if parameterless else None
        self.embedding = nn.Embedding(VOCABULARY, FEATURES, sparse=True) if sparse_embedding else None
        self.body = nn.Sequential(
            nn.Linear(FEATURES, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)
        )
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(16, 1))
        if tied:
            self.body[5].weight = self.body[3].weight
        if init_gain != 1.0:
            with torch.no_grad():
                for module in self.modules():
                    if isinstance(module, nn.Linear):
                        module.weight.mul_(init_gain)
        if frozen:
            self.body[0].requires_grad_(False)
        if compile_backend is not None:
            self.body = torch.compile(self.body, backend=compile_backend)
            self.head = torch.compile(self.head, backend=compile_backend)

    def forward(self, features: Tensor, tokens: Tensor) -> Tensor:
        if self.fixed is not None:
            features = self.fixed(features)
        if self.embedding is not None:
            features = features + self.embedding(tokens)
        return self.head(self.body(features))

    def _loss(self, batch: Any) -> Tensor:
        features, tokens, target = batch
        fault = self.fault.get(self.trainer.fit_loop.total_batch_idx) if self.training else None
        if fault == "nan_input":
            features = features.clone()
            features[0, 0] = math.nan
        loss = nn.functional.mse_loss(self(features, tokens), target)
        if fault == "nan_loss":
            loss = loss * math.nan
        elif fault == "inf_loss":
            loss = loss * math.inf
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        loss = self._loss(batch)
        if self.log_in_training_step:
            self.log("train_loss", loss)
        if self.automatic_optimization:
            return loss
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()
        if self.scheduler == "step":
            schedulers = self.lr_schedulers()
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()
        return None

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization and self.scheduler == "epoch":
            schedulers = self.lr_schedulers()
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch))

    def _optimizer(self, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.embedding is not None:
            return torch.optim.SGD(parameters, lr=0.05)  # Adam rejects sparse gradients
        return torch.optim.Adam(parameters, lr=0.01)

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.two_optimizers:
            head = {id(p) for p in self.head.parameters()}
            groups = [[p for p in trainable if id(p) not in head], [p for p in trainable if id(p) in head]]
        else:
            groups = [trainable]
        optimizers = [self._optimizer(group) for group in groups]
        if self.scheduler is None:
            return optimizers
        schedulers = [
            {
                "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8),
                "interval": self.scheduler,
            }
            for optimizer in optimizers
        ]
        return optimizers, schedulers

    def train_dataloader(self) -> DataLoader:
        return matrix_data()

    def val_dataloader(self) -> DataLoader:
        return matrix_data(batches=2, seed=1)

    def test_dataloader(self) -> DataLoader:
        return matrix_data(batches=2, seed=2)


@dataclass(frozen=True)
class Cell:
    """One configuration of the matrix: the model's options and the trainer's.

    ``fp16_scaler`` runs ``16-mixed`` with a ``GradScaler`` on the CPU (Lightning's ``precision="16-mixed"``
    silently becomes bf16 there); the plugin is built per run, since the scaler carries state.
    ``compile_module`` passes ``torch.compile(model, backend=compile_module)`` to ``fit``.
    """

    name: str
    model: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    fp16_scaler: bool = False
    compile_module: str | None = None

    def with_trainer(self, **options: Any) -> Cell:
        """The same cell with more trainer options."""
        return replace(self, trainer={**self.trainer, **options})


def full_suite() -> list[Callback]:
    """The four callbacks with their defaults (the guard's table off: it only prints)."""
    return [GradNormMonitor(), ExplosionGuard(console_summary=False), InitAudit(), ArchitectureAdvisor()]


SUITE_MEMBERS: dict[str, Any] = {
    "GradNormMonitor": GradNormMonitor,
    "ExplosionGuard": lambda: ExplosionGuard(console_summary=False),
    "InitAudit": InitAudit,
    "ArchitectureAdvisor": ArchitectureAdvisor,
}
"""Each callback alone, built with its defaults."""


class GradientReference(Callback):
    """Records, before every optimizer step, the float64 L2 norm of the gradients that optimizer will use.

    Passive (reads ``.grad`` only): the reference the monitor's logged norms are checked against, as
    ``total_norms[optimizer_index] -> [(logging_step, norm), ...]``.
    """

    def __init__(self) -> None:
        self.total_norms: dict[int, list[tuple[int, float]]] = defaultdict(list)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        raw = getattr(optimizer, "_optimizer", optimizer)
        index = next(i for i, candidate in enumerate(trainer.optimizers) if candidate is raw)
        squares, seen = 0.0, set()
        for group in raw.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None or id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                grad = parameter.grad.detach()
                grad = grad.coalesce().values() if grad.is_sparse else grad
                squares += float(grad.double().pow(2).sum())
        self.total_norms[index].append((trainer.fit_loop.epoch_loop._batches_that_stepped, math.sqrt(squares)))


def user_metrics(logger: MemoryLogger) -> dict[str, list[tuple[int, float]]]:
    """What the LightningModule itself logged (everything but the suite's scalars: ``gradstab/...`` and the
    effective learning rate ``lr-<Optimizer>/gradstab_effective`` logged beside LearningRateMonitor's)."""
    return {key: values for key, values in logger.metrics.items() if "gradstab" not in key}


@dataclass
class CellRun:
    """What one training run of a cell left behind."""

    trainer: pl.Trainer
    model: MatrixModel
    weights: dict[str, Tensor]
    logger: MemoryLogger
    reference: GradientReference
    callbacks: list[Callback]


def build_model(cell: Cell) -> MatrixModel:
    """The cell's model, initialised from seed 0 (identical in every run of every cell)."""
    pl.seed_everything(0, verbose=False)
    return MatrixModel(**cell.model)


def trainer_for(cell: Cell, root: Path, callbacks: list[Callback], logger: Logger | bool, **extra: Any) -> pl.Trainer:
    """A quiet single-process CPU trainer logging every step, with the cell's options."""
    options = {
        "max_steps": 8,
        "log_every_n_steps": 1,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 0,
        "deterministic": True,
        **cell.trainer,
        **extra,
    }
    if cell.fp16_scaler:
        options["plugins"] = [MixedPrecision("16-mixed", "cpu")]
    return quiet_trainer(default_root_dir=str(root), callbacks=callbacks, logger=logger, **options)


def final_weights(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of the trained model, as detached copies."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def run_cell(cell: Cell, root: Path, callbacks: list[Callback], **fit_options: Any) -> CellRun:
    """Train ``cell`` once with ``callbacks`` (plus a passive gradient reference) and collect the results."""
    torch.set_num_threads(1)
    model = build_model(cell)
    logger, reference = MemoryLogger(), GradientReference()
    trainer = trainer_for(cell, root, [reference, *callbacks], logger)
    module = torch.compile(model, backend=cell.compile_module) if cell.compile_module else model
    trainer.fit(module, **fit_options)
    return CellRun(trainer, model, final_weights(model), logger, reference, callbacks)


def assert_bit_identical(weights: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Same names, and every tensor ``torch.equal`` to the expected one (names of the differing ones shown)."""
    assert weights.keys() == expected.keys()
    differing = [name for name in weights if not torch.equal(weights[name], expected[name])]
    assert not differing, f"weights differ from the run without the suite: {differing}"


def guard_actions(guard: ExplosionGuard) -> dict[str, int]:
    """Interventions of every policy of ``guard`` (clips, skips, rollbacks, stops), summed over optimizers."""
    acted: dict[str, int] = defaultdict(int)
    for policy in guard.policies.values():
        for name in ("clip", "skip", "rollback", "stop"):
            acted[name] += policy.counts.get(name, 0)
    return {name: count for name, count in acted.items() if count}
