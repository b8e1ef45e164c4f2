"""TensorBoard presentation: the "Gradient stability" custom-scalar layout and the gradient-flow figure.

The layout names every tag the suite writes (monitor, guard and advisor), so a user who opens TensorBoard
sees the panels without configuring anything. Tags that a run never writes simply show empty charts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch.utils.tensorboard.summary import custom_scalars

LAYOUT_CATEGORY = "Gradient stability"

_LAYOUT_CHARTS: dict[str, tuple[str, list[str]]] = {
    # chart title -> (chart kind, tag regexes)
    "total gradient norm and clip threshold": (
        "Multiline",
        [r"gradstab/grad_norm/(opt\d+/)?total$", r"gradstab/(opt\d+/)?clip_threshold$"],
    ),
    "per-layer gradient norms": ("Multiline", [r"gradstab/grad_norm/(?!(opt\d+/)?total$).*"]),
    "gradient-to-weight ratios": ("Multiline", [r"gradstab/grad_to_weight/.*"]),
    "update-to-weight ratios": ("Multiline", [r"gradstab/update_to_weight/.*"]),
    "max |grad|": ("Multiline", [r"gradstab/grad_max/.*"]),
    "non-finite gradients": ("Multiline", [r"gradstab/nonfinite/.*", r"gradstab/(opt\d+/)?amp_overflow$"]),
    "guard level and actions": (
        "Multiline",
        [r"gradstab/(opt\d+/)?(level|clipped|skipped|lr_scale|rollbacks|zscore)$"],
    ),
}


def add_layout(writer: Any) -> None:
    """Register the "Gradient stability" layout on a ``SummaryWriter`` (once per writer)."""
    if getattr(writer, "_gradstab_layout_added", False):
        return
    layout = {LAYOUT_CATEGORY: {title: [kind, tags] for title, (kind, tags) in _LAYOUT_CHARTS.items()}}
    writer._get_file_writer().add_summary(custom_scalars(layout))
    writer._gradstab_layout_added = True


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
