"""The console a user sees: the suite's tables survive Lightning's progress bars and piped output stays readable.

A tiny fit (``tests/scripts/console_fit.py``) runs under a pseudo-terminal with ``RichProgressBar`` and with
``TQDMProgressBar``; its bytes are replayed on a ``pyte`` terminal emulator, whose final screen is what a person
would read. Each table must be there whole: title, top border, every row between the borders, bottom border,
every line the same width (a bar redrawn over a table shifts or cuts its lines).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from lightning_gradstab.report import (
    GUARD_STOPPED,
    MAX_PLAIN_WIDTH,
    NARROW_WIDTH,
    Finding,
    Report,
    fit_summary,
    render_text,
)
from tests.helpers.subprocess_env import REPO, child_env

pyte = pytest.importorskip("pyte")

COLUMNS, ROWS = 120, 600


def _start_under_pty(bars: str, out_dir: Path) -> tuple[subprocess.Popen, int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = child_env(drop=("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TERM_PROGRAM"), TERM="xterm-256color")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "scripts" / "console_fit.py"), bars, str(out_dir)],
        stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
    )
    os.close(slave)
    return process, master


def _screen(process: subprocess.Popen, master: int) -> list[str]:
    screen = pyte.Screen(COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        stream.feed(data)
    os.close(master)
    assert process.wait(timeout=120) == 0, "\n".join(screen.display)
    return [line.rstrip() for line in screen.display]


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> dict[str, list[str]]:
    """The final screen of one process that fits under the Rich bar, then under the TQDM bar, split per fit."""
    lines = _screen(*_start_under_pty("rich,tqdm", tmp_path_factory.mktemp("fits")))
    markers = {bar: lines.index(f"=== {bar} progress bar ===") for bar in ("rich", "tqdm")}
    return {"rich": lines[markers["rich"] : markers["tqdm"]], "tqdm": lines[markers["tqdm"] :]}


def whole_table(lines: list[str], title: str) -> tuple[int, str]:
    """The line index of the table titled ``title`` and its text, after checking that it is intact."""
    starts = [index for index, line in enumerate(lines) if line.strip() == title]
    assert len(starts) == 1, f"{title!r} should be on the screen once:\n" + "\n".join(lines)
    top = starts[0] + 1
    assert lines[top].startswith("┏"), f"no top border under {title!r}:\n" + "\n".join(lines[top - 1 : top + 5])
    bottom = next(index for index in range(top, len(lines)) if lines[index].startswith("└"))
    block = lines[top : bottom + 1]
    for line in block:
        assert line[0] in "┏┃┡│├└" and line[-1] in "┓┃┩│┤┘", f"a line of {title!r} is cut:\n" + "\n".join(block)
        assert "it/s" not in line, f"the progress bar drew into {title!r}:\n" + "\n".join(block)
    assert len({len(line) for line in block}) == 1, f"{title!r} is misaligned:\n" + "\n".join(block)
    return starts[0], "\n".join(block)


@pytest.mark.parametrize("bar", ["rich", "tqdm"])
def test_guard_and_advisor_tables_are_whole_on_the_screen_under_the_progress_bar(screens, bar):
    lines = screens[bar]
    audit_at, audit = whole_table(lines, "Gradient stability: StalledMLP (InitAudit)")
    advisor_at, advisor = whole_table(lines, "Gradient stability: StalledMLP (ArchitectureAdvisor)")
    guard_at, guard = whole_table(lines, "ExplosionGuard summary")
    assert "init.scale" in audit
    assert "arch.residual" in advisor and "arch.normalization" in advisor
    assert "│ 0 " in guard and "1 (clip)" in guard  # the one optimizer's row, at its resting level
    summary_at = lines.index("Gradient stability: what this fit found")
    assert audit_at < advisor_at < guard_at < summary_at, "the one summary comes last, after every table"
    assert sum("what this fit found" in line for line in lines) == 1
    assert any(line.startswith("next") and "init.scale" in line for line in lines[summary_at:])


def _report() -> Report:
    recommendation = "Re-initialise network.1 ... network.29 with He/Kaiming normal (std = sqrt(2/fan_in)). " * 2
    evidence = {"predicted_signal_factor": 3.8e-5, "weight_std_over_recommended_median": 0.71}
    finding = Finding("init.scale", "error", ("network.1", "network.29"), evidence, recommendation.strip())
    return Report([finding], model="MLP")


def test_piped_output_has_one_line_per_finding_without_colour_codes_or_boxes():
    text = render_text(_report(), terminal=False)
    lines = text.splitlines()
    assert lines[0] == "Gradient stability: MLP (diagnose): 1 finding"
    assert lines[1].startswith("  error init.scale [network.1, network.29] predicted_signal_factor=3.8e-05;")
    assert "sqrt(2/fan_in)). Re-initialise" in " ".join(lines)  # the whole sentence, continued on the next line
    assert all(len(line) <= MAX_PLAIN_WIDTH for line in lines)
    assert "\x1b[" not in text and "│" not in text


@pytest.mark.parametrize("width", [60, 80, 100, 140])
def test_terminal_output_fits_the_terminal_width_and_never_splits_a_word(width):
    text = render_text(_report(), terminal=True, width=width)
    visible = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in text.splitlines() if line.strip()]
    assert max(len(line) for line in visible) <= width and len(visible) >= 4
    words = " ".join(visible).replace("│", " ").split()
    assert "predicted_signal_factor=3.8e-05;" in words and "weight_std_over_recommended_median=0.71" in words
    assert ("┏" in text) == (width >= NARROW_WIDTH)  # a table where it fits, the stacked form below


def test_fit_summary_says_what_was_found_and_what_to_do_in_the_callers_terms():
    finding = Finding("init.scale", "error", ("network.1",), {}, "Use He init.")
    guard = {"stopped": True, "stop_reason": "NaN at step 7", "optimizers": {"0": {"counts": {"skip": 3}}}}
    hydra_terms = {"init.scale": "rerun with `model.init=he`", GUARD_STOPPED: "lower `optim.optimizer.lr`"}
    text = render_text(*fit_summary([Report([finding], source="InitAudit")], [guard], hydra_terms), terminal=False)
    assert "InitAudit: init.scale (error)" in text
    assert "skip=3" in text and "stopped: NaN at step 7" in text
    assert "- lower `optim.optimizer.lr`" in text and "- rerun with `model.init=he`" in text
    assert "Use He init." not in text  # the caller's terms replace the Python advice


def test_a_clean_fit_gets_one_line():
    (line,) = render_text(*fit_summary([Report([], source="InitAudit")], [{"optimizers": {}}]), terminal=False)\
        .splitlines()
    assert line == "Gradient stability: no findings, and the guard took no action."
