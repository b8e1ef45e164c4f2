"""Leaving the model as it was found: buffers, train/eval flags and the RNG state restored bit for bit.

The probe runs the model in training mode on a real batch (BatchNorm updates its running statistics, dropout
draws masks); :func:`preserved_state` makes that invisible to the training that follows, and :func:`seed_rng`
seeds the generators it forks so dropout draws the same masks wherever the probe runs. Python's and NumPy's
global generators are forked and seeded too: models draw masks from them as well (the span masks of Hugging Face
speech encoders come from ``numpy.random``); NumPy only when something has imported it, since a model that uses
it has.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


@contextmanager
def preserved_state(
    model: nn.Module, modules: list[nn.Module] | None = None, devices: list[int] | None = None
) -> Iterator[None]:
    """Restore buffers, train/eval flags and the RNG state of ``model`` bit for bit on exit.

    Example::

        with preserved_state(model):
            model.train()
            model(x)  # BatchNorm running stats change here ...
        # ... and are back to their old values here
    """
    # ``modules``: ``model.modules()`` already listed, ``devices``: the CUDA devices of its parameters (the probe's
    # tracer walks the model once for everything)
    modules = list(model.modules()) if modules is None else modules
    if devices is None:
        devices = cuda_devices(p for m in modules for p in m.parameters(recurse=False))
    modes = [(module, module.training) for module in modules]
    buffers = [buffer for module in modules for buffer in module.buffers(recurse=False)]
    saved = [buffer.detach().clone() for buffer in buffers]
    python_rng, numpy_rng = random.getstate(), _numpy_random()
    numpy_state = numpy_rng.get_state() if numpy_rng is not None else None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_rng)
        if numpy_rng is not None:
            numpy_rng.set_state(numpy_state)
        with torch.no_grad():
            _copy_all(buffers, saved)
        for module, training in modes:
            if module.training != training:  # nn.Module.__setattr__ is slow: only the flags that changed
                module.training = training


def _copy_all(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``target.copy_(source)`` for each pair, in one multi-tensor call where torch takes them together."""
    if len(targets) > 1:
        try:
            torch._foreach_copy_(targets, sources)
            return
        except (RuntimeError, TypeError):  # a tensor type the multi-tensor kernel does not take: one by one
            pass
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


def cuda_devices(parameters: Iterable[Tensor]) -> list[int]:
    """The indices of the CUDA devices the parameters live on (their generators are forked and seeded)."""
    return sorted({p.device.index for p in parameters if p.is_cuda} - {None})


def _numpy_random() -> Any:
    """``numpy.random`` when NumPy is imported (a model that draws from it has imported it), else None."""
    numpy = sys.modules.get("numpy")
    return getattr(numpy, "random", None)


def seed_rng(seed: int, devices: list[int]) -> None:
    """Seed the CPU generator, those of the model's CUDA devices, and Python's and NumPy's global generators
    (``preserved_state`` restores them all)."""
    random.seed(seed)
    numpy_rng = _numpy_random()
    if numpy_rng is not None:
        numpy_rng.seed(seed)
    torch.default_generator.manual_seed(seed)
    for index in devices:
        torch.cuda.default_generators[index].manual_seed(seed)
