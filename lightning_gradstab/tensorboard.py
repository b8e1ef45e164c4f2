"""TensorBoard presentation: the "Gradient stability" custom-scalar layout and the per-layer pictures.

The layout lists only the charts whose tags the run's callbacks will write with their settings, so no panel is
empty. Gradient norms span orders of magnitude across layers and TensorBoard's custom-scalar charts have linear
axes, so the per-layer picture is drawn as an image: a layer x step heat map of log10 gradient norms
("gradient flow over time"), and the log-scale summary (log10 of the total, and of the smallest, median and
largest layer norm) is logged as scalars. Per-layer scalars are for small models; a 100-layer model would
bury the Scalars tab under hundreds of charts.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

LAYOUT_CATEGORY = "Gradient stability"

CHARTS: dict[str, list[str]] = {
    # chart title -> tag regexes (each chart is a TensorBoard "Multiline" chart)
    "total gradient norm and clip threshold": [
        r"gradstab/grad_norm/(opt\d+/)?total$",
        r"gradstab/(opt\d+/)?clip_threshold$",
    ],
    "log10 gradient norm: total and smallest / median / largest layer": [r"gradstab/log10_grad_norm/.*"],
    "per-layer gradient norms": [r"gradstab/grad_norm/(?!(opt\d+/)?total$).*"],
    "gradient-to-weight ratios": [r"gradstab/grad_to_weight/.*"],
    "log10 update-to-weight ratio: smallest / median / largest layer": [r"gradstab/log10_update/.*"],
    "update-to-weight ratios": [r"gradstab/update_to_weight/.*"],
    "max |grad|": [r"gradstab/grad_max/.*"],
    "non-finite gradients": [r"gradstab/nonfinite/.*", r"gradstab/(opt\d+/)?amp_overflow$"],
    "guard level and LR scale": [r"gradstab/(opt\d+/)?(level|lr_scale)$"],
    "guard actions (1 = acted on that step; rollbacks: running count)": [
        r"gradstab/(opt\d+/)?(clipped|skipped|rollbacks)$"
    ],
    "guard spike z-score of log(total norm)": [r"gradstab/(opt\d+/)?zscore$"],
}
"""Every chart the suite can fill; :func:`add_layout` registers the subset a run writes."""

GUARD_CHARTS: tuple[str, ...] = (
    "total gradient norm and clip threshold",
    "non-finite gradients",
    "guard level and LR scale",
    "guard actions (1 = acted on that step; rollbacks: running count)",
    "guard spike z-score of log(total norm)",
)
"""The charts ``ExplosionGuard`` fills."""

HEATMAP_TAG = "gradstab/gradient_flow_over_time"
"""Image tag of :func:`gradient_heatmap_figure` (``/opt{i}`` appended when there are several optimizers)."""

_WRITERS_WITH_LAYOUT: weakref.WeakSet[Any] = weakref.WeakSet()
"""Writers that already hold the layout (one ``add_custom_scalars`` per writer: a second would replace it)."""


def add_layout(writer: Any, charts: Iterable[str] | None = None) -> None:
    """Register the "Gradient stability" layout on a ``SummaryWriter`` (once per writer).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (``TensorBoardLogger.experiment``).
        charts: titles from :data:`CHARTS` that the run will fill (default: all of them).

    Example::

        add_layout(logger.experiment, ["total gradient norm and clip threshold", "non-finite gradients"])
    """
    if writer in _WRITERS_WITH_LAYOUT:
        return
    wanted = set(CHARTS if charts is None else charts)
    unknown = wanted - set(CHARTS)
    if unknown:
        raise ValueError(f"`charts` must be titles from lightning_gradstab.tensorboard.CHARTS, got {sorted(unknown)}")
    layout = {LAYOUT_CATEGORY: {title: ["Multiline", tags] for title, tags in CHARTS.items() if title in wanted}}
    writer.add_custom_scalars(layout)
    _WRITERS_WITH_LAYOUT.add(writer)


def gradient_heatmap_figure(
    steps: Sequence[int], layer_names: Sequence[str], norms: Sequence[Sequence[float]], *, title: str = ""
) -> Any:
    """Layer x step heat map of log10 gradient norms: the picture of gradients vanishing or exploding over time.

    Args:
        steps: the logging steps, one per column.
        layer_names: one per row, input (top) to output (bottom).
        norms: ``norms[i][j]`` = gradient norm of layer ``j`` at ``steps[i]``; zero, NaN and Inf are drawn grey.

    The colour scale spans at least 4 decades around the data, so a healthy net (all layers within a decade)
    is one colour band and a vanishing one (the input layers decades below the output layers) a gradient.

    Example::

        figure = gradient_heatmap_figure([0, 10], ["net.0", "net.2"], [[1e-4, 1e-1], [2e-4, 1e-1]])
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import numpy as np
    from matplotlib.figure import Figure

    values = np.asarray(norms, dtype=np.float64).T  # layers x steps
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(values)
    valid = np.isfinite(logs)
    low, high = (float(logs[valid].min()), float(logs[valid].max())) if valid.any() else (-1.0, 1.0)
    middle, half_span = (low + high) / 2, max((high - low) / 2, 2.0)
    height = min(9.0, max(3.5, 0.12 * len(layer_names) + 1.5))
    figure = Figure(figsize=(9.0, height), layout="constrained")
    axes = figure.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.6")
    image = axes.imshow(
        np.ma.masked_invalid(logs),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        vmin=middle - half_span,
        vmax=middle + half_span,
        extent=(-0.5, len(steps) - 0.5, len(layer_names) - 0.5, -0.5),
    )
    figure.colorbar(image, ax=axes, label="log10 ‖gradient‖ of the layer")
    tick_every = max(1, math.ceil(len(layer_names) / 40))
    axes.set_yticks(range(0, len(layer_names), tick_every), list(layer_names)[::tick_every], fontsize=7)
    step_ticks = list(range(0, len(steps), max(1, math.ceil(len(steps) / 8))))
    axes.set_xticks(step_ticks, [str(steps[i]) for i in step_ticks])
    axes.set_xlabel("step")
    axes.set_ylabel("layer (input at the top)")
    axes.set_title(title or "Gradient flow over time")
    return figure


def gradient_flow_figure(
    group_names: Sequence[str], mean_abs: Sequence[float], max_abs: Sequence[float], *, title: str = ""
) -> Any:
    """The classic vanishing-gradient picture: mean and max |grad| per layer, input to output, log scale."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    positions = range(len(group_names))
    figure = Figure(figsize=(max(6.0, 0.35 * len(group_names)), 4.0), layout="constrained")
    axes = figure.subplots()
    floor = 1e-30  # log scale: a zero gradient is drawn at the floor, not dropped
    axes.bar(positions, [max(v, floor) for v in max_abs], alpha=0.35, color="tab:cyan", label="max |grad|")
    axes.bar(positions, [max(v, floor) for v in mean_abs], alpha=0.9, color="tab:blue", label="mean |grad|")
    axes.set_yscale("log")
    finite = [v for v in list(mean_abs) + list(max_abs) if v > 0 and math.isfinite(v)]
    if finite:
        axes.set_ylim(min(finite) / 3, max(finite) * 3)
    axes.set_xticks(list(positions), list(group_names), rotation=90, fontsize=7)
    axes.set_xlabel("layer (input → output)")
    axes.set_ylabel("|gradient|")
    axes.set_title(title or "Gradient flow")
    axes.legend(loc="upper right")
    return figure
