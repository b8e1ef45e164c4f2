"""``lightning_gradstab.compiled``: the eager code behind ``torch.compile``, on real compiled modules (the eager
backend: nothing here should compile, and if something did it would cost no C++ build)."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.compile import from_compiled
from torch import nn
from torch._dynamo.utils import counters

import lightning_gradstab.compiled as compiled_module
from lightning_gradstab.compiled import eager_compiled, eager_module, uncompiled_method


def _graphs() -> int:
    return sum(counters["stats"].values())


def test_eager_module_is_the_module_behind_torch_compile():
    net = nn.Linear(4, 2)
    assert eager_module(torch.compile(net, backend="eager")) is net
    assert eager_module(net) is net


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), backend="eager")
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_eager_compiled_runs_compiled_submodules_eagerly_and_puts_them_back():
    model, x = _Outer(), torch.randn(3, 4)
    body = eager_module(model.body)
    compiled_forward = model.body.forward
    seen = []
    body[0].register_forward_hook(lambda module, args, output: seen.append(output))  # fires only when eager
    graphs = _graphs()
    with eager_compiled(model):
        assert model.body.forward.__self__ is body  # the eager module's __call__
        output = model(x)
    assert _graphs() == graphs  # nothing compiled
    assert len(seen) == 1 and torch.equal(output, model.head(body(x)))
    assert model.body.forward is compiled_forward
    with eager_compiled(model, modules=[model, model.head]):  # only the modules listed are looked at
        assert model.body.forward is compiled_forward


class _Steps(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch).sum()


def test_uncompiled_method_reads_lightnings_originals_of_a_compiled_lightning_module():
    module = _Steps()
    assert uncompiled_method(module, "training_step") is None  # not compiled
    original_step, original_forward = module.training_step, module.forward
    compiled = from_compiled(torch.compile(module, backend="eager"))  # what Trainer.fit does with it
    assert compiled is module and module.training_step != original_step  # replaced by the compiled one
    assert uncompiled_method(module, "training_step") == original_step
    assert uncompiled_method(module, "forward") == original_forward
    assert uncompiled_method(module, "no_such_method") is None


def test_the_module_imports_no_lightning():
    tree = ast.parse(Path(compiled_module.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] in ("lightning", "pytorch_lightning")]
