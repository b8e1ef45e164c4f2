"""The eager code behind ``torch.compile``: what the diagnosis runs instead of a compiled graph.

Module hooks and ``TorchFunctionMode``s do not see inside a compiled graph, and tracing through one would
recompile it; so the probe runs the eager module (``torch.compile(model)`` keeps it as ``_orig_mod``), swaps each
compiled submodule's ``forward`` for its eager module's call while it runs, and calls a compiled
LightningModule's original methods (Lightning keeps them in ``_compiler_ctx``). Pure PyTorch: Lightning's
dictionary is only read, never imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


def eager_module(model: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile(model)`` (``_orig_mod``), else ``model`` itself.

    Example::

        assert eager_module(torch.compile(net)) is net
    """
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else model


@contextmanager
def eager_compiled(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[None]:
    """Run every ``torch.compile``d submodule eagerly for the duration of the block.

    Module hooks added after compiling are not called inside the compiled graph, and tracing through it would
    recompile; so each ``OptimizedModule``'s compiled ``forward`` is swapped for its eager module's call and put
    back afterwards. Nothing is compiled, the compiled graphs stay as they were. ``modules``: ``model.modules()``
    when the caller has already listed them.

    Example::

        with eager_compiled(model):  # model.body = torch.compile(body)
            model(x)                  # body runs eagerly here
    """
    swapped = []
    for module in model.modules() if modules is None else modules:
        # an OptimizedModule's compiled forward is an instance attribute: asked first, so the eager module is
        # looked up (getattr raises and catches where it is missing) only on the few modules that have one
        if "forward" not in module.__dict__:
            continue
        original = getattr(module, "_orig_mod", None)
        if isinstance(original, nn.Module):
            swapped.append((module, module.__dict__["forward"]))
            module.__dict__["forward"] = original.__call__
    try:
        yield
    finally:
        for module, compiled in swapped:
            module.__dict__["forward"] = compiled


def uncompiled_method(module: nn.Module, name: str) -> Callable[..., Any] | None:
    """The original ``name`` method (``"forward"``, ``"training_step"``...) of a LightningModule that Lightning
    compiled (``Trainer.fit(torch.compile(module))`` replaces them and keeps the originals in the module's
    ``_compiler_ctx``), None when the module was not compiled that way.

    Example::

        from lightning.pytorch.utilities.compile import from_compiled

        module = from_compiled(torch.compile(model))  # what Trainer.fit does with a compiled LightningModule
        step = uncompiled_method(module, "training_step") or module.training_step  # the eager step
    """
    context = getattr(module, "_compiler_ctx", None)
    if context and f"original_{name}" in context:
        return context[f"original_{name}"]
    return None
