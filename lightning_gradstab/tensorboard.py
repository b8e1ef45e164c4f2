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
    # chart title -> tag regexes (each chart is a TensorBoard "Multiline" chart); ``{opt}`` is the optimizer's
    # scope: empty with one optimizer, ``opt0/``, ``opt1/``, ... with several (one chart per optimizer then)
    "total gradient norm and clip threshold": [
        r"gradstab/grad_norm/{opt}total$",
        r"gradstab/{opt}clip_threshold$",
    ],
    "log10 gradient norm: total and smallest / median / largest layer": [r"gradstab/log10_grad_norm/{opt}[^/]+$"],
    "per-layer gradient norms": [r"gradstab/grad_norm/{opt}(?!total$)(?!opt\d+/)[^/]+$"],
    "gradient-to-weight ratios": [r"gradstab/grad_to_weight/{opt}[^/]+$"],
    "log10 update-to-weight ratio: smallest / median / largest layer": [r"gradstab/log10_update/{opt}[^/]+$"],
    "update-to-weight ratios": [r"gradstab/update_to_weight/{opt}[^/]+$"],
    "max |grad|": [r"gradstab/grad_max/{opt}[^/]+$"],
    "non-finite gradients": [r"gradstab/nonfinite/{opt}count$", r"gradstab/{opt}amp_overflow$"],
    "Adam log10 update RMS: smallest / median / largest layer": [r"gradstab/adam/{opt}log10_update_rms/[^/]+$"],
    "Adam outlier coordinates (g^2 > 25 v_hat): share of all, largest layer": [
        r"gradstab/adam/{opt}outlier_fraction/(total|layer_max)$"
    ],
    "Adam second moment: log10 recent g^2 / v_hat and log10 v_hat change": [
        r"gradstab/adam/{opt}log10_(recent_grad_sq_ratio|second_moment_change)/[^/]+$"
    ],
    "guard level (0 observe ... 6 stop)": [r"gradstab/{opt}level$"],
    "guard LR scale (1 = the scheduled learning rate)": [r"gradstab/{opt}lr_scale$"],
    "guard actions (1 = acted on that step; rollbacks: running count)": [
        r"gradstab/{opt}(clipped|skipped|rollbacks)$"
    ],
    "guard spike z-score of log(total norm)": [r"gradstab/{opt}zscore$"],
}
"""Every chart the suite can fill, one quantity each (the guard level and the LR scale have their own axes);
:func:`add_layout` registers the subset a run writes, once per optimizer."""

GUARD_CHARTS: tuple[str, ...] = (
    "total gradient norm and clip threshold",
    "non-finite gradients",
    "guard level (0 observe ... 6 stop)",
    "guard LR scale (1 = the scheduled learning rate)",
    "guard actions (1 = acted on that step; rollbacks: running count)",
    "guard spike z-score of log(total norm)",
)
"""The charts ``ExplosionGuard`` fills."""

HEATMAP_TAG = "gradstab/gradient_flow_over_time"
"""Image tag of :func:`gradient_heatmap_figure` (``/opt{i}`` appended when there are several optimizers)."""

HEATMAP_FILENAME = "gradstab_gradient_flow_over_time{suffix}.png"
"""The heat map's file in the log directory when no logger of the run takes images (e.g. ``CSVLogger``)."""

_WRITERS_WITH_LAYOUT: weakref.WeakSet[Any] = weakref.WeakSet()
"""Writers that already hold the layout (one ``add_custom_scalars`` per writer: a second would replace it)."""


def chart_tags(title: str, optimizer: int | None = None) -> list[str]:
    """The tag regexes of chart ``title`` for ``optimizer`` (None: the run has one optimizer, tags unscoped)."""
    scope = "" if optimizer is None else f"opt{optimizer}/"
    return [pattern.replace("{opt}", scope) for pattern in CHARTS[title]]


def add_layout(writer: Any, charts: Iterable[str] | None = None, optimizers: int = 1) -> None:
    """Register the "Gradient stability" layout on a ``SummaryWriter`` (once per writer).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (``TensorBoardLogger.experiment``).
        charts: titles from :data:`CHARTS` that the run will fill (default: all of them).
        optimizers: how many optimizers the run has; with several, each chart is repeated per optimizer (titled
            ``... (opt1)``), so two optimizers' norms never share an axis.

    Example::

        add_layout(logger.experiment, ["total gradient norm and clip threshold", "non-finite gradients"])
    """
    if writer in _WRITERS_WITH_LAYOUT:
        return
    wanted = set(CHARTS if charts is None else charts)
    unknown = wanted - set(CHARTS)
    if unknown:
        raise ValueError(f"`charts` must be titles from lightning_gradstab.tensorboard.CHARTS, got {sorted(unknown)}")
    if isinstance(optimizers, bool) or not isinstance(optimizers, int) or optimizers < 1:
        raise ValueError(f"`optimizers` must be a positive int, got {optimizers!r}")
    layout: dict[str, dict[str, list[Any]]] = {}
    for optimizer in range(optimizers) if optimizers > 1 else (None,):
        category = LAYOUT_CATEGORY if optimizer is None else f"{LAYOUT_CATEGORY}: optimizer {optimizer}"
        layout[category] = {
            title: ["Multiline", chart_tags(title, optimizer)] for title in CHARTS if title in wanted
        }
    writer.add_custom_scalars(layout)
    _WRITERS_WITH_LAYOUT.add(writer)


HEATMAP_COLOURS = {"zero": "#bdbdbd", "nan": "#e41a1c", "inf": "#ff7f00"}
"""Colours of the heat map cells that have no log10: a zero gradient (a dead layer) grey, NaN red, Inf orange,
each named in the figure's legend; finite norms use viridis."""


def gradient_heatmap_figure(
    steps: Sequence[int], layer_names: Sequence[str], norms: Sequence[Sequence[float]], *, title: str = ""
) -> Any:
    """Layer x step heat map of log10 gradient norms: the picture of gradients vanishing or exploding over time.

    Args:
        steps: the optimizer steps, one per column.
        layer_names: one per row, input (top) to output (bottom).
        norms: ``norms[i][j]`` = gradient norm of layer ``j`` at ``steps[i]``; zero, NaN and Inf cells are drawn
            in the colours of :data:`HEATMAP_COLOURS`, with a legend saying which is which.

    The colour scale spans at least 4 decades around the data, so a healthy net (all layers within a decade)
    is one colour band and a vanishing one (the input layers decades below the output layers) a gradient.

    Example::

        figure = gradient_heatmap_figure([0, 10], ["net.0", "net.2"], [[1e-4, 1e-1], [2e-4, 1e-1]])
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    values = np.asarray(norms, dtype=np.float64).T.reshape(len(layer_names), len(steps))  # layers x steps
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(values)
    valid = np.isfinite(logs)
    low, high = (float(logs[valid].min()), float(logs[valid].max())) if valid.any() else (-1.0, 1.0)
    middle, half_span = (low + high) / 2, max((high - low) / 2, 2.0)
    height = min(9.0, max(3.5, 0.12 * len(layer_names) + 1.5))
    figure = Figure(figsize=(9.0, height), layout="constrained")
    axes = figure.subplots()
    extent = (-0.5, len(steps) - 0.5, len(layer_names) - 0.5, -0.5)
    image = axes.imshow(
        np.ma.masked_invalid(logs),
        aspect="auto",
        interpolation="nearest",
        cmap=matplotlib.colormaps["viridis"].with_extremes(bad=(0, 0, 0, 0)),
        vmin=middle - half_span,
        vmax=middle + half_span,
        extent=extent,
    )
    special = np.full(values.shape, np.nan)
    kinds = [("zero", values == 0), ("nan", np.isnan(values)), ("inf", np.isinf(values))]
    for code, (_, where) in enumerate(kinds):
        special[where] = code
    present = [name for name, where in kinds if where.any()]
    if present:
        colours = ListedColormap([HEATMAP_COLOURS[name] for name, _ in kinds]).with_extremes(bad=(0, 0, 0, 0))
        axes.imshow(np.ma.masked_invalid(special), aspect="auto", interpolation="nearest", cmap=colours,
                    vmin=-0.5, vmax=len(kinds) - 0.5, extent=extent)
    labels = {"zero": "zero gradient", "nan": "NaN", "inf": "Inf"}
    handles = [Patch(facecolor=HEATMAP_COLOURS[name], edgecolor="0.3", label=labels[name]) for name, _ in kinds]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.12), ncol=3, fontsize=8, frameon=False,
                title=None if present else "none in this run:")
    figure.colorbar(image, ax=axes, label="log10 ‖gradient‖ of the layer")
    tick_every = max(1, math.ceil(len(layer_names) / 40))
    axes.set_yticks(range(0, len(layer_names), tick_every), list(layer_names)[::tick_every], fontsize=7)
    step_ticks = list(range(0, len(steps), max(1, math.ceil(len(steps) / 8))))
    if steps and step_ticks[-1] != len(steps) - 1:
        step_ticks.append(len(steps) - 1)  # the last step is always labelled
    axes.set_xticks(step_ticks, [str(steps[i]) for i in step_ticks])
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("layer (input at the top)")
    axes.set_title(title or "Gradient flow over time")
    return figure


class HeatmapBuffer:
    """Per-layer values of every optimizer step, kept on their device for the heat map (bounded memory).

    :meth:`add` keeps a reference to the step's tensor: no copy, no kernel, no host transfer (a list append;
    a device copy into a preallocated buffer cost ~45 us per step on a CPU whose caches the gradient pass has
    just flushed). :meth:`columns` stacks the kept columns and moves them to the host once, when the figure is
    drawn, after an optional device ``transform`` (e.g. per-parameter squared norms summed into per-layer
    norms, so the step itself pays for no grouping). When the buffer is full, every other column is dropped,
    halving the time resolution, so a run of any length keeps at most ``capacity`` columns, spread over the
    whole run, and the newest step is always there (a step the stride skips is kept aside until the next).

    The tensors added must not be modified in place afterwards (the suite's statistics are new tensors every
    step).

    Args:
        names: one per row of the figure (per layer).
        capacity: most columns kept (>= 2).
        width: length of each added vector, when it is not one value per name (default ``len(names)``).

    Example::

        buffer = HeatmapBuffer(("net.0", "net.2"), capacity=512)
        buffer.add(step, norms)  # each optimizer step
        steps, columns = buffer.columns()  # when drawing
    """

    def __init__(self, names: Sequence[str], capacity: int = 512, width: int | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"`capacity` must be an int >= 2, got {capacity!r}")
        if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 0):
            raise ValueError(f"`width` must be a non-negative int or None, got {width!r}")
        self.names = tuple(names)
        self.capacity = capacity
        self.width = len(self.names) if width is None else width
        self.stride = 1  # keep one step in ``stride``: doubles each time the buffer fills
        self.steps: list[int] = []
        self._values: list[Any] = []  # the kept columns, one per entry of ``steps``
        self._latest: Any = None  # the newest column when the stride did not keep it
        self._latest_step = -1
        self._seen = 0

    def add(self, step: int, norms: Any) -> None:
        """Record the values (a 1-d tensor of ``width`` entries) of optimizer step ``step``."""
        self._latest_step = step
        self._seen += 1
        if (self._seen - 1) % self.stride:
            self._latest = norms
            return
        self._latest = None
        if len(self.steps) == self.capacity:
            del self._values[1::2], self.steps[1::2]
            self.stride *= 2
            self._seen = 1
        self._values.append(norms)
        self.steps.append(step)

    @property
    def latest_step(self) -> int:
        """The newest step added (-1 before the first)."""
        return self._latest_step

    def columns(self, transform: Any = None) -> tuple[list[int], list[list[float]]]:
        """The recorded steps and their values on the host (one transfer), oldest first, as float32 values;
        ``transform`` maps the ``[columns, width]`` device tensor to ``[columns, len(names)]`` before the
        transfer."""
        if not self.steps:
            return [], []
        import torch

        kept = list(self._values)
        steps = list(self.steps)
        if self._latest is not None:
            kept.append(self._latest)
            steps.append(self._latest_step)
        values = torch.stack([column.reshape(-1) for column in kept]).to(torch.float32)
        if transform is not None:
            values = transform(values)
        return steps, values.cpu().tolist()


_TOLD_ABOUT_PNG: weakref.WeakSet[Any] = weakref.WeakSet()


def save_heatmap_png(trainer: Any, figure: Any, scope: str = "") -> Any:
    """Write the heat map as :data:`HEATMAP_FILENAME` into the log directory, for a run whose loggers take no
    images (``CSVLogger``); the first time per trainer a warning says where (not at verbosity ``quiet``).
    Returns the path, None when it could not be written.

    Example::

        save_heatmap_png(trainer, gradient_heatmap_figure(steps, names, norms))  # <log_dir>/gradstab_...png
    """
    from pathlib import Path

    from lightning.pytorch.utilities import rank_zero_warn

    logger = trainer.loggers[0] if trainer.loggers else None  # not trainer.log_dir: a collective, rank 0 only here
    directory = Path(getattr(logger, "log_dir", None) or trainer.default_root_dir)
    path = directory / HEATMAP_FILENAME.format(suffix=f"_{scope.rstrip('/')}" if scope else "")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    except OSError as error:  # a picture must never stop training
        rank_zero_warn(f"lightning_gradstab: could not write the gradient heat map to {str(path)!r}: {error!r}")
        return None
    from lightning_gradstab.console import get_verbosity

    if trainer not in _TOLD_ABOUT_PNG and get_verbosity() != "quiet":
        _TOLD_ABOUT_PNG.add(trainer)
        rank_zero_warn(
            f"lightning_gradstab: no TensorBoard logger takes the gradient heat map; it is written to {path} "
            "(redrawn every heatmap_every_n_steps and at the end of training)."
        )
    return path


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
