"""Character-level language modelling on text every Python installation ships: standard-library source.

No download: the corpus is the source of a fixed list of stdlib modules (``inspect.getsource``), cut to
``max_chars``. It is English prose (docstrings, comments) mixed with code, enough for a small GPT to show
learning-rate spikes and what warm-up, pre-LN and clipping do to them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from examples.tasks.base import ExampleTask, OptimizerFactory

DEFAULT_MODULES = ("textwrap", "argparse", "json.decoder", "string", "heapq", "bisect", "fractions")


def stdlib_corpus(module_names: Sequence[str], max_chars: int) -> str:
    """The concatenated source of ``module_names``, truncated to ``max_chars`` characters.

    Example::

        text = stdlib_corpus(["textwrap", "string"], max_chars=50_000)
    """
    texts = [inspect.getsource(importlib.import_module(name)) for name in module_names]
    return "\n".join(texts)[:max_chars]


def char_windows(codes: Tensor, block_size: int) -> TensorDataset:
    """Non-overlapping (input, next-character target) windows of ``block_size`` characters.

    Example::

        windows = char_windows(torch.arange(1000), block_size=64)  # 15 windows; targets shifted by one
    """
    count = (len(codes) - 1) // block_size
    inputs = codes[: count * block_size].view(count, block_size)
    targets = codes[1 : count * block_size + 1].view(count, block_size)
    return TensorDataset(inputs, targets)


class CharLMTask(ExampleTask):
    """Next-character prediction with a small GPT (``conf/model/gpt.yaml``); accuracy is top-1 per character.

    Args:
        build_network: ``CharGPT`` with its shape and the pre-/post-LN switch bound.
        block_size: context length in characters.
        modules: standard-library modules whose source forms the corpus.
        max_chars: corpus length cap; the last 10% is the validation split.
        z_loss: weight of PaLM's auxiliary loss ``z_loss * log(Z)^2`` on the output logits' log-partition
            (Chowdhery et al. 2022; Wortsman et al. 2023 use 1e-4 against output-logit divergence); 0 = off.

    Example::

        task = CharLMTask(partial(CharGPT, num_layers=2), partial(torch.optim.AdamW, lr=3e-3), warmup_steps=100)
    """

    def __init__(
        self,
        build_network: Callable[..., nn.Module],
        build_optimizer: OptimizerFactory,
        warmup_steps: int = 0,
        batch_size: int = 32,
        block_size: int = 64,
        modules: Sequence[str] = DEFAULT_MODULES,
        max_chars: int = 200_000,
        z_loss: float = 0.0,
        cosine_steps: int = 0,
    ) -> None:
        super().__init__(build_optimizer, warmup_steps, batch_size, cosine_steps)
        if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not 0.0 <= z_loss < 1.0:
            raise ValueError(f"`z_loss` must be a float in [0, 1), got {z_loss!r}")
        self.z_loss = float(z_loss)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"`block_size` must be an int >= 2, got {block_size!r}")
        text = stdlib_corpus(list(modules), max_chars)
        if len(text) < 20 * block_size:
            raise ValueError(f"`max_chars`={max_chars} gives a corpus of {len(text)} chars; need >= {20 * block_size}")
        self.vocabulary = "".join(sorted(set(text)))
        lookup = {char: index for index, char in enumerate(self.vocabulary)}
        codes = torch.tensor([lookup[char] for char in text], dtype=torch.long)
        split = int(0.9 * len(codes))
        self.train_dataset = char_windows(codes[:split], block_size)
        self.val_dataset = char_windows(codes[split:], block_size)
        self.network = self.build_network(
            build_network, "lm", vocab_size=len(self.vocabulary), block_size=block_size
        )

    def loss_and_correct(self, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, targets = batch
        logits = self.network(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if self.z_loss and self.training:
            loss = loss + self.z_loss * torch.logsumexp(logits.float(), dim=-1).square().mean()
        return loss, (logits.argmax(dim=2) == targets).flatten()
