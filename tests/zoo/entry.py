"""One zoo model: how to build it with a batch, and where its architecture and init come from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ZooEntry:
    """A model factory and its provenance.

    Attributes:
        name: short id (test ids, table rows).
        build: returns ``(model, batch)``; ``batch`` is a tensor, a tuple or a dict of keyword arguments.
        source: the library class and config the model is built from.
        reduced: how it differs in size from the published configuration.
        expected: warnings that are right on this model, code -> the paper that says why (cited in the table).
    """

    name: str
    build: Callable[[], tuple[nn.Module, Any]]
    source: str
    reduced: str = ""
    expected: dict[str, str] = field(default_factory=dict)

    def __call__(self) -> tuple[nn.Module, Any]:
        torch.manual_seed(0)  # library inits draw from the global RNG
        return self.build()


def generator(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def token_batch(vocab: int, batch: int = 4, length: int = 16, **extra: Any) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, length), generator=generator())
    return {"input_ids": ids, **extra}


def image_batch(size: int = 32, batch: int = 4, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=generator())
