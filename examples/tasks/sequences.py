"""Pascanu, Mikolov & Bengio (2013)'s long-range synthetic tasks, generated on the fly from a seed.

Both hide the information the answer needs at the start of a long sequence of noise, so the gradient must
travel back ``seq_len`` steps: with a vanilla RNN it vanishes or, at cliffs of the loss, explodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from examples.tasks.base import ExampleTask, OptimizerFactory

PROBLEMS = ("temporal_order", "adding")
ADDING_TOLERANCE = 0.04  # an adding-problem answer counts as correct within this absolute error


def temporal_order(num_sequences: int, seq_len: int, generator: torch.Generator) -> TensorDataset:
    """One-hot sequences of 6 symbols; classify the order of the two A/B symbols (AA, AB, BA, BB).

    The first relevant symbol sits in [10%, 20%) of the sequence, the second in [50%, 60%); all other
    positions are distractors c, d, e, f.

    Example::

        data = temporal_order(1000, seq_len=50, generator=torch.Generator().manual_seed(0))
    """
    symbols = torch.randint(2, 6, (num_sequences, seq_len), generator=generator)
    first = torch.randint(int(0.1 * seq_len), max(int(0.2 * seq_len), int(0.1 * seq_len) + 1), (num_sequences,),
                          generator=generator)
    second = torch.randint(int(0.5 * seq_len), max(int(0.6 * seq_len), int(0.5 * seq_len) + 1), (num_sequences,),
                           generator=generator)
    first_symbol, second_symbol = torch.randint(0, 2, (2, num_sequences), generator=generator)
    rows = torch.arange(num_sequences)
    symbols[rows, first], symbols[rows, second] = first_symbol, second_symbol
    return TensorDataset(F.one_hot(symbols, 6).float(), 2 * first_symbol + second_symbol)


def adding(num_sequences: int, seq_len: int, generator: torch.Generator) -> TensorDataset:
    """Pairs (value in U[0, 1], marker); the target is the sum of the two marked values.

    One marker sits in the first 10% of the sequence, the other in the second half.

    Example::

        data = adding(1000, seq_len=100, generator=torch.Generator().manual_seed(0))  # inputs (1000, 100, 2)
    """
    values = torch.rand(num_sequences, seq_len, generator=generator)
    first = torch.randint(0, max(int(0.1 * seq_len), 1), (num_sequences,), generator=generator)
    second = torch.randint(seq_len // 2, seq_len, (num_sequences,), generator=generator)
    markers = torch.zeros(num_sequences, seq_len)
    rows = torch.arange(num_sequences)
    markers[rows, first], markers[rows, second] = 1.0, 1.0
    targets = values[rows, first] + values[rows, second]
    return TensorDataset(torch.stack([values, markers], dim=2), targets.unsqueeze(1))


class SequenceTask(ExampleTask):
    """Train a recurrent net on the temporal-order or adding problem at a configurable sequence length.

    Args:
        build_network: ``RecurrentNet`` with its cell and init bound (``conf/model/rnn.yaml``).
        problem: ``"temporal_order"`` (4-way classification) or ``"adding"`` (regression, MSE).
        seq_len: sequence length T: the distance the gradient must travel.
        num_train_sequences, num_val_sequences: dataset sizes, drawn once per run from ``data_seed``.

    Example::

        task = SequenceTask(partial(RecurrentNet, cell="rnn"), partial(torch.optim.SGD, lr=0.01), seq_len=50)
    """

    def __init__(
        self,
        build_network: Callable[..., nn.Module],
        build_optimizer: OptimizerFactory,
        warmup_steps: int = 0,
        batch_size: int = 20,
        problem: str = "temporal_order",
        seq_len: int = 50,
        num_train_sequences: int = 2000,
        num_val_sequences: int = 500,
        data_seed: int = 0,
    ) -> None:
        super().__init__(build_optimizer, warmup_steps, batch_size)
        if problem not in PROBLEMS:
            raise ValueError(f"`problem` must be one of {list(PROBLEMS)}, got {problem!r}")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 10:
            raise ValueError(f"`seq_len` must be an int >= 10, got {seq_len!r}")
        self.problem = problem
        make = temporal_order if problem == "temporal_order" else adding
        generator = torch.Generator().manual_seed(data_seed)
        self.train_dataset = make(num_train_sequences, seq_len, generator)
        self.val_dataset = make(num_val_sequences, seq_len, generator)
        input_size, output_size = (6, 4) if problem == "temporal_order" else (2, 1)
        self.network = self.build_network(
            build_network, f"rnn/{problem}", input_size=input_size, output_size=output_size
        )

    def loss_and_correct(self, batch: Any) -> tuple[Tensor, Tensor]:
        sequences, targets = batch
        outputs = self.network(sequences)
        if self.problem == "adding":
            return F.mse_loss(outputs, targets), (outputs - targets).abs().squeeze(1) < ADDING_TOLERANCE
        return F.cross_entropy(outputs, targets), outputs.argmax(dim=1) == targets
