"""A fit's console output fits the terminal and the log: under a pseudo-terminal of 80 and of 120 columns and
piped to a file, with Lightning's Rich and TQDM progress bars.

``tests/scripts/console_fit.py`` runs the whole suite on a stalling 30-layer MLP, once under each bar, in one
process per output. Under a terminal, the raw bytes are checked line by line (no line the suite writes is
wider than the terminal; a wider one would wrap into a broken row) and replayed on a ``pyte`` emulator, whose
final screen is what a person reads: every table whole (title, borders, each row between them, one width; a bar
redrawn over a table shifts or cuts its lines). Piped, every line is at most 160 characters and each finding
is one line (continued, indented, past 160).
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

from lightning_gradstab.console import MAX_PLAIN_WIDTH
from tests.helpers.subprocess_env import REPO, child_env

pyte = pytest.importorskip("pyte")

ROWS = 600
SCRIPT = REPO / "tests" / "scripts" / "console_fit.py"
ENV = {"drop": ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TERM_PROGRAM"), "TERM": "xterm-256color"}
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")
NOT_OURS = re.compile(r"\.py:\d+: |💡 Tip|`Trainer\.fit` stopped|it/s|TPU available|GPU available")
"""Lines Lightning and Python's warnings write (their width is not the suite's to choose)."""


def _start(columns: int | None, out_dir: Path) -> tuple[subprocess.Popen, int | Path]:
    """The fit under a pseudo-terminal of ``columns`` (None: stdout and stderr piped to a file)."""
    command = [sys.executable, str(SCRIPT), "rich,tqdm", str(out_dir)]
    if columns is None:
        log = out_dir.with_suffix(".log")
        with open(log, "wb") as stream:
            return subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=child_env(**ENV)), log
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, columns, 0, 0))
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=child_env(**ENV), close_fds=True)
    os.close(slave)
    return process, master


def _read_all(master: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    return data


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[object, bytes]:
    """The bytes each output received: 80 and 120 columns, and "piped". The three fits run side by side."""
    root = tmp_path_factory.mktemp("fits")
    started = {key: _start(None if key == "piped" else key, root / str(key)) for key in (80, 120, "piped")}
    data = {key: _read_all(handle) for key, (_, handle) in started.items() if key != "piped"}
    for key, (process, _) in started.items():
        assert process.wait(timeout=180) == 0, data.get(key, b"")[-3000:].decode(errors="replace")
    data["piped"] = started["piped"][1].read_bytes()
    return data


def _lines(raw: bytes) -> list[str]:
    """What the output wrote, split where the terminal starts a new line or returns the cursor."""
    return re.split(r"[\r\n]", ESCAPES.sub("", raw.decode("utf-8", errors="replace")))


def _screen(raw: bytes, columns: int) -> list[str]:
    screen = pyte.Screen(columns, ROWS)
    pyte.ByteStream(screen).feed(raw)
    return [line.rstrip() for line in screen.display]


def whole_table(lines: list[str], title: str) -> str:
    """The text of the table titled ``title`` (once on screen), after checking that every row is intact."""
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
    return "\n".join(block)


@pytest.mark.parametrize("columns", [80, 120])
def test_no_line_the_suite_writes_is_wider_than_the_terminal(outputs, columns):
    ours = [line for line in _lines(outputs[columns]) if line.strip() and not NOT_OURS.search(line)]
    too_wide = [line for line in ours if len(line) > columns]
    assert not too_wide, "\n".join(too_wide)
    assert any("what this fit found" in line for line in ours)


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("bar", ["rich", "tqdm"])
def test_every_table_and_finding_is_whole_on_the_screen_under_the_progress_bar(outputs, columns, bar):
    screen = _screen(outputs[columns], columns)
    markers = {name: screen.index(f"=== {name} progress bar ===") for name in ("rich", "tqdm")}
    lines = screen[markers["rich"] : markers["tqdm"]] if bar == "rich" else screen[markers["tqdm"] :]
    guard = whole_table(lines, "ExplosionGuard summary")
    assert "│ 0 " in guard and "1 (clip)" in guard  # the one optimizer's row, at its resting level
    for source in ("InitAudit", "ArchitectureAdvisor"):
        title = f"Gradient stability: StalledMLP ({source})"
        if columns >= 100:
            assert "init.scale" in whole_table(lines, title) or source != "InitAudit"
        else:  # stacked: a heading line per finding, its fix indented under it, never cut by the bar
            at = lines.index(title)
            assert lines[at + 1].startswith("error ") and lines[at + 2].startswith("  ")
    assert "error init.scale network.0, network.2" in "\n".join(lines) or columns >= 100
    summary_at = lines.index("Gradient stability: what this fit found")
    guard_at = next(index for index, line in enumerate(lines) if line.strip() == "ExplosionGuard summary")
    assert guard_at < summary_at, "the one summary comes last, after every table"
    assert sum("what this fit found" in line for line in lines) == 1
    assert any(line.startswith("next") and "init.scale" in line for line in lines[summary_at:])


def test_piped_output_is_at_most_160_characters_a_line_with_one_line_per_finding(outputs):
    text = outputs["piped"].decode()
    ours = [line for line in text.splitlines() if ESCAPES.sub("", line).strip() and not NOT_OURS.search(line)]
    assert not [line for line in ours if "\x1b[" in line], "no colour codes in a file (tqdm's bar aside)"
    too_wide = [line for line in ours if len(line) > MAX_PLAIN_WIDTH]
    assert not too_wide, "\n".join(too_wide)
    for bar in ("rich", "tqdm"):
        part = text.split(f"=== {bar} progress bar ===")[1].split("=== tqdm progress bar ===")[0]
        assert "Gradient stability: StalledMLP (InitAudit): 3 findings" in part
        assert re.search(r"^  error init\.scale \[network\.0, network\.2, …, network\.56 \(29 modules\)\] ", part, re.M)
        rows = [line for line in part.splitlines() if line.startswith("│ 0 ")]
        assert len(rows) == 1 and rows[0].endswith("│"), "the guard's row whole, between its borders"
