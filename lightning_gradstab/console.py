"""The console: what the suite prints, where, and whether it prints at all.

Every table and line the suite prints goes through :func:`console_print`: it honours the one verbosity switch
(:func:`set_verbosity`, or the ``GRADSTAB_VERBOSITY`` environment variable), wraps to a terminal's width or
writes plain lines of at most :data:`MAX_PLAIN_WIDTH` characters to a pipe or a file, and prints around
Lightning's Rich or TQDM progress bar so that the bar does not draw over it. :func:`render_text` is the same
rendering into a string. What is printed (a :class:`~lightning_gradstab.report.Report`, a table) is the
caller's; this module knows only Rich renderables. Lightning is imported only to recognise a trainer's progress
bar, inside the function that is handed a trainer.
"""

from __future__ import annotations

import io
import shutil
import sys
from typing import Any, Literal, cast

MAX_PLAIN_WIDTH = 160
"""Widest line :func:`console_print` writes when the output is not a terminal (a CI log, a file): longer rows
wrap inside their cells, findings take the compact one-line form of
:meth:`~lightning_gradstab.report.Report.to_lines`."""

Verbosity = Literal["normal", "quiet"]
VERBOSITY_ENV = "GRADSTAB_VERBOSITY"
"""Environment variable read when :func:`set_verbosity` was not called: ``quiet`` or ``normal`` (inherited by
DDP ranks and Hydra jobs, so one setting covers every process of a run)."""

_verbosity: Verbosity | None = None


def set_verbosity(level: Verbosity) -> Verbosity:
    """The one switch for what the suite prints; returns the previous level.

    ``"quiet"``: the four callbacks and ``gradstab audit`` still log their scalars, images and text to the
    loggers and write their report files, but print nothing (no tables, no end-of-fit summary). ``"normal"``
    (the default) prints them. Without a call, the ``GRADSTAB_VERBOSITY`` environment variable decides;
    ``gradstab audit --quiet`` sets it for the CLI.

    Example::

        from lightning_gradstab import set_verbosity

        set_verbosity("quiet")  # e.g. in a sweep: everything goes to TensorBoard and the JSON files
    """
    global _verbosity
    if level not in ("normal", "quiet"):
        raise ValueError(f"`level` must be 'normal' or 'quiet', got {level!r}")
    previous = get_verbosity()
    _verbosity = level
    return previous


def get_verbosity() -> Verbosity:
    """The level :func:`set_verbosity` set, else ``GRADSTAB_VERBOSITY`` (``quiet``/``normal``), else ``normal``."""
    if _verbosity is not None:
        return _verbosity
    import os

    value = os.environ.get(VERBOSITY_ENV, "normal").strip().lower() or "normal"
    if value not in ("normal", "quiet"):
        raise ValueError(f"environment variable {VERBOSITY_ENV} must be 'normal' or 'quiet', got {value!r}")
    return value  # type: ignore[return-value]


def console_print(*renderables: Any, trainer: Any = None, stream: Any = None) -> None:
    """Print rich renderables (tables, strings with markup) so that Lightning's progress bar cannot draw over them.

    Every table of the suite goes through here, and nothing is printed at verbosity ``quiet``
    (:func:`set_verbosity`). On a terminal the output wraps to the terminal's width (cells wrap between
    words); piped or redirected to a file, lines are at most :data:`MAX_PLAIN_WIDTH` characters, findings one
    line each, with no colour codes. While ``trainer`` shows a progress bar:

    - ``RichProgressBar``: printed through Rich's global console, the one the bar's live display draws on,
      which keeps the bar below the printed lines instead of redrawing over them;
    - ``TQDMProgressBar`` (or any tqdm bar): written with ``tqdm.write``, which clears the bars, writes the
      lines and redraws the bars under them.

    Example::

        console_print(report.to_rich_table(), "[bold]next:[/] model.init=he", trainer=trainer)
    """
    if get_verbosity() == "quiet":
        return
    stream = stream or sys.stdout
    bar = _progress_bar(trainer)
    terminal = _is_terminal(stream)
    if bar == "rich" and terminal and stream is sys.stdout:
        from rich import get_console

        for renderable in renderables:
            get_console().print(renderable)
        return
    text = render_text(*renderables, terminal=terminal)
    if bar == "tqdm":
        from tqdm import tqdm

        tqdm.write(text.rstrip("\n"), file=stream)
    else:
        stream.write(text)
        stream.flush()


def render_text(*renderables: Any, terminal: bool, width: int | None = None) -> str:
    """Render to text: for a terminal with colours at ``width`` (default: the terminal's), else plain, as wide
    as the widest row needs up to ``width`` (default :data:`MAX_PLAIN_WIDTH`), findings in their compact form."""
    from rich.console import Console
    from rich.measure import Measurement

    if terminal:
        width = width or shutil.get_terminal_size(fallback=(120, 24)).columns
    console = Console(
        file=io.StringIO(),
        width=width or MAX_PLAIN_WIDTH,
        force_terminal=terminal,
        color_system="auto" if terminal else None,
        highlight=False,
        soft_wrap=False,
    )
    for renderable in renderables:
        if not terminal:
            natural = Measurement.get(console, console.options, console.render_str(renderable)
                                      if isinstance(renderable, str) else renderable).maximum
            console.print(renderable, width=max(1, min(natural, width or MAX_PLAIN_WIDTH)))
        else:
            console.print(renderable)
    text = cast(io.StringIO, console.file).getvalue()  # the StringIO the console was given above
    return text if terminal else "".join(line.rstrip() + "\n" for line in text.splitlines())


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _progress_bar(trainer: Any) -> str | None:
    """``"rich"`` or ``"tqdm"`` when ``trainer`` shows Lightning's Rich or TQDM progress bar, else None."""
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    if bar is None or not getattr(bar, "is_enabled", False):
        return None
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if isinstance(bar, RichProgressBar):
        return "rich"
    if isinstance(bar, TQDMProgressBar):
        return "tqdm"
    return None
