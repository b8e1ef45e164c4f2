"""Every ``Example::`` block of the public API runs as written, on a tiny model, optimizer, batch and trainer.

The blocks are the docstrings of ``lightning_gradstab.__all__`` (and their public methods) plus the pure
modules whose functions are meant to be called directly (guard events, training-time and optimizer rules) and the
guard's watcher of outside writes. Each
runs in a fresh namespace that holds ``model`` (a 64 -> 10 LightningModule with gradients), ``optimizer``, ``batch``,
``trainer`` and a ``pl``/``Trainer`` whose trainers run two CPU steps.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from types import ModuleType, SimpleNamespace

import lightning.pytorch as lightning_pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gradstab
from lightning_gradstab import guard_events, update_ceiling
from lightning_gradstab.callbacks import _guard_writes
from lightning_gradstab.diagnosis import optimizer_rules, training_rules, weight_decay_rules
from lightning_gradstab.logits import qk_clip
from tests.helpers.trainers import quiet_trainer

MODULES: tuple[ModuleType, ...] = (
    guard_events, training_rules, optimizer_rules, weight_decay_rules, qk_clip, update_ceiling, _guard_writes
)


def _examples(obj: object) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    blocks = []
    for part in doc.split("Example::\n")[1:]:
        block = re.match(r"((?:[ \t]*\n| {4}.*\n?)*)", part).group(1)
        blocks.append(textwrap.dedent(block).strip())
    return [block for block in blocks if block]


def _members(obj: object) -> list[tuple[str, object]]:
    found = [("", obj)]
    if inspect.isclass(obj):
        for name, value in vars(obj).items():
            if name.startswith("_"):
                continue
            if isinstance(value, (classmethod, staticmethod)):
                value = value.__func__
            if isinstance(value, property):
                value = value.fget
            if inspect.isfunction(value):
                found.append((f".{name}", value))
    return found


def _cases() -> list[tuple[str, str]]:
    owners = [(name, getattr(lightning_gradstab, name)) for name in lightning_gradstab.__all__]
    for module in MODULES:
        owners.append((module.__name__, module))
        owners += [
            (f"{module.__name__}.{name}", value)
            for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
        ]
    cases = []
    for owner, obj in owners:
        for suffix, member in _members(obj):
            cases += [(f"{owner}{suffix}[{i}]", block) for i, block in enumerate(_examples(member))]
    return cases


class ExampleModel(lightning_pl.LightningModule):
    """64 features -> 10 classes, He-initialised, with a train_dataloader, so ``trainer.fit(model)`` works."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        for layer in (self.net[0], self.net[2]):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 64, generator=generator), torch.randint(0, 10, (64,), generator=generator))
        return DataLoader(data, batch_size=16)


def _namespace(tmp_path) -> dict[str, object]:
    def trainer_factory(**kwargs):
        return quiet_trainer(max_steps=2, default_root_dir=tmp_path, **kwargs)

    model = ExampleModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = torch.randn(32, 64)
    F.cross_entropy(model(batch), torch.zeros(32, dtype=torch.long)).backward()
    namespace: dict[str, object] = {name: getattr(lightning_gradstab, name) for name in lightning_gradstab.__all__}
    for module in MODULES:
        namespace.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    namespace.update(
        torch=torch,
        nn=nn,
        pl=SimpleNamespace(Trainer=trainer_factory),
        Trainer=trainer_factory,
        model=model,
        optimizer=optimizer,
        batch=batch,
        x=batch,
        trainer=trainer_factory(),
        guard=lightning_gradstab.ExplosionGuard(),
    )
    return namespace


CASES = _cases()


def test_the_public_api_has_examples_to_run():
    owners = {case.split("[")[0] for case, _ in CASES}
    assert {"InitAudit", "ExplosionGuard", "GradNormMonitor", "ArchitectureAdvisor", "diagnose"} <= owners
    assert len(CASES) >= 15


@pytest.mark.parametrize(("owner", "source"), CASES, ids=[case for case, _ in CASES])
def test_docstring_example_runs(owner, source, tmp_path):
    namespace = _namespace(tmp_path)
    exec(compile(source, f"<Example of {owner}>", "exec"), namespace)
    trainer = namespace["trainer"]
    if "trainer.fit(model)" in source:  # the example trained: its callbacks saw the steps
        assert trainer.global_step == 2
    if owner.startswith("InitAudit["):
        assert namespace["trainer"].callbacks[0].report.source == "InitAudit"
