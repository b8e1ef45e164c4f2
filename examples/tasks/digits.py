"""scikit-learn's 8x8 handwritten digits (1797 images, shipped inside the package): deep MLPs and CNNs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from examples.tasks.base import ExampleTask, OptimizerFactory


def load_digits_tensors(val_fraction: float, split_seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Standardised (N, 1, 8, 8) images and labels, split into train/val by a seeded permutation.

    Example::

        train, val = load_digits_tensors(val_fraction=0.2, split_seed=0)  # 1437 and 360 images
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    images = (images - images.mean()) / images.std()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    num_val = round(val_fraction * len(labels))
    val, train = order[:num_val], order[num_val:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


class DigitsTask(ExampleTask):
    """Classify 8x8 digits with the configured MLP or CNN (the setting of the he2015/glorot2010/resnet2016 presets).

    Args:
        build_network: ``build_mlp`` or ``build_cnn`` with its architecture bound (``conf/model``).
        val_fraction: share of the 1797 images held out for validation.
        split_seed: seed of the train/val split (fixed, so every run of a sweep sees the same split).

    Example::

        task = DigitsTask(partial(build_mlp, depth=30, init="he"), partial(torch.optim.SGD, lr=0.003))
    """

    def __init__(
        self,
        build_network: Callable[..., nn.Module],
        build_optimizer: OptimizerFactory,
        warmup_steps: int = 0,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        split_seed: int = 0,
    ) -> None:
        super().__init__(build_optimizer, warmup_steps, batch_size)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
        self.train_dataset, self.val_dataset = load_digits_tensors(val_fraction, split_seed)
        self.network = self.build_network(build_network, "digits", input_shape=(1, 8, 8), num_classes=10)

    def loss_and_correct(self, batch: Any) -> tuple[Tensor, Tensor]:
        images, labels = batch
        logits = self.network(images)
        return F.cross_entropy(logits, labels), logits.argmax(dim=1) == labels
