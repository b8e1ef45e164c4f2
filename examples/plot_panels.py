"""Draw a run's "Gradient stability" TensorBoard section into one PNG, for docs and for machines without a browser.

Reads the scalars of the run's event file and lays them out chart by chart exactly as the custom-scalar
layout groups them (``lightning_gradstab.tensorboard``: same titles, same tag patterns), plus the latest
gradient-flow heat map. It is a rendering of the logged numbers, not a browser screenshot.

Example::

    python examples/plot_panels.py outputs/default/2026-11-23_23-54-36 panels.png
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

MAX_LINES_PER_CHART = 12  # per-layer charts: every 3rd layer or so, else 30 lines are an unreadable bundle


def plot_panels(run_dir: Path, output: Path) -> list[str]:
    """Render every non-empty chart of the layout for the event file under ``run_dir``; return their titles.

    Example::

        titles = plot_panels(Path("outputs/default/2026-11-23_23-54-36"), Path("panels.png"))
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_gradstab.tensorboard import CHARTS, HEATMAP_TAG

    events = sorted(Path(run_dir).rglob("events.out.tfevents.*"))
    if not events:
        raise FileNotFoundError(f"no TensorBoard event file under {run_dir}")
    accumulator = EventAccumulator(str(events[-1]), size_guidance={"scalars": 0, "images": 1})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    charts = []
    for title, patterns in CHARTS.items():
        patterns = [pattern.replace("{opt}", r"(opt\d+/)?") for pattern in patterns]  # any optimizer's scope
        matched = [tag for tag in tags if any(re.match(pattern, tag) for pattern in patterns)]
        if matched:
            stride = max(1, len(matched) // MAX_LINES_PER_CHART)
            charts.append((title, matched[::stride]))
    images = sorted(accumulator.Tags()["images"], key=lambda tag: not tag.startswith(HEATMAP_TAG))  # heat map first
    panels = len(charts) + bool(images)
    columns = 2
    rows = (panels + columns - 1) // columns
    figure = Figure(figsize=(7 * columns, 3.6 * rows), layout="constrained")
    axes_grid = figure.subplots(rows, columns, squeeze=False).ravel()
    for axes, (title, matched) in zip(axes_grid, charts, strict=False):
        for tag in matched:
            points = accumulator.Scalars(tag)
            values = [point.value for point in points]
            positive = all(value > 0 for value in values)
            axes.plot([point.step for point in points], values, label=tag.removeprefix("gradstab/"), linewidth=1)
            if positive and not title.startswith(("guard", "non-finite", "log10")):
                axes.set_yscale("log")
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.legend(fontsize=6, ncol=2)
    if images:
        axes = axes_grid[len(charts)]
        latest = accumulator.Images(images[0])[-1]
        axes.imshow(imread(io.BytesIO(latest.encoded_image_string), format="png"))
        axes.set_title(f"{images[0]} (step {latest.step})")
        axes.axis("off")
    for axes in axes_grid[panels:]:
        axes.axis("off")
    figure.suptitle(f"Gradient stability: {run_dir}")
    figure.savefig(output, dpi=100)
    return [title for title, _ in charts]


def main() -> None:
    """Command line: ``python examples/plot_panels.py RUN_DIR OUTPUT.png``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a job directory written by examples/train.py")
    parser.add_argument("output", type=Path, help="PNG file to write")
    arguments = parser.parse_args()
    titles = plot_panels(arguments.run_dir, arguments.output)
    print(f"wrote {arguments.output}: {', '.join(titles)}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
