"""The monitor's pictures: the layer x step heat map, gradient histograms and the gradient-flow figure.

They are drawn at intervals on TensorBoard (the heat map as a PNG beside other loggers' files) and cost a
host transfer and a matplotlib figure each time, unlike the per-step scalars. Kept apart from ``monitor.py``
so the monitor's module holds its hot path and its scalars; these are what it draws now and then.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradstab import tensorboard
from lightning_gradstab.callbacks._shared import tensorboard_writers
from lightning_gradstab.distributed import local_shard
from lightning_gradstab.stats import GradientStats, GroupBy


def draw_heatmap(
    trainer: pl.Trainer, heat: tensorboard.HeatmapBuffer, groups: tuple[tuple[str, ...], Tensor], scope: str
) -> int:
    """Draw the heat map of the steps ``heat`` holds (its per-parameter norms summed into ``groups``: names and
    each parameter's group); the last step drawn."""
    names, index = groups

    def layer_norms(squares: Tensor) -> Tensor:  # [columns, parameters] squared norms -> [columns, layers]
        sums = torch.zeros((squares.shape[0], len(names)), dtype=squares.dtype, device=squares.device)
        return sums.index_add_(1, index, squares).sqrt()

    steps, norms = heat.columns(layer_norms)  # the one host transfer of this drawing
    title = f"Gradient flow over time {scope}(log10 L2 gradient norm per layer, steps {steps[0]}-{steps[-1]})"
    figure = tensorboard.gradient_heatmap_figure(steps, heat.names, norms, title=title)
    writers = tensorboard_writers(trainer)
    if writers:
        tag = tensorboard.HEATMAP_TAG + (f"/{scope.rstrip('/')}" if scope else "")
        for writer in writers:
            writer.add_figure(tag, figure, steps[-1])
    elif trainer.loggers:  # loggers that take no images (CSVLogger): a PNG beside their files
        tensorboard.save_heatmap_png(trainer, figure, scope)
    return steps[-1]


def add_histograms(trainer: pl.Trainer, stats: GradientStats, group_by: GroupBy, scope: str, step: int) -> None:
    """One TensorBoard histogram of the gradient entries per group (copied to the host)."""
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    names, index = stats.layout.group_index(group_by)
    members: dict[int, list[Tensor]] = {}
    for position, group in enumerate(index.tolist()):
        grad = stats.layout.parameters[position].grad
        if grad is not None:
            grad = local_shard(grad)
            members.setdefault(group, []).append(grad.detach().reshape(-1).float())
    for group, grads in members.items():
        values = torch.cat(grads).cpu()
        for writer in writers:
            writer.add_histogram(f"gradstab/grad_hist/{scope}{names[group]}", values, step)


def add_gradient_flow_figure(
    trainer: pl.Trainer, stats: GradientStats, group_by: GroupBy, scope: str, step: int
) -> None:
    """The mean and largest absolute gradient per group, as one figure (computed on every rank)."""
    # computed on every rank: under sharded strategies the extra norms are collectives
    names, l1 = stats.group_norms(group_by, 1.0)
    _, maxima = stats.group_norms(group_by, math.inf)
    sizes = torch.tensor([float(p.numel()) for p in stats.layout.parameters], device=l1.device)
    _, group_sizes = stats.group_sums(sizes, group_by)
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    mean_abs = (l1 / group_sizes.clamp_min(1)).tolist()
    figure = tensorboard.gradient_flow_figure(
        names, mean_abs, maxima.tolist(), title=f"Gradient flow {scope}(step {step})"
    )
    for writer in writers:
        writer.add_figure(f"gradstab/gradient_flow{'/' + scope.rstrip('/') if scope else ''}", figure, step)
