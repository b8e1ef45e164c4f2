"""Refresh every quoted results table in README.md and docs/*.md from the results file it names.

A quoted table sits between ``<!-- results: PATH -->`` and ``<!-- /results -->``. This replaces the block's
table (its first run of ``|`` lines) with the table of PATH that has the same header line, so after a script
re-measured (e.g. ``scripts/regenerate_presets.sh``) the docs quote the new numbers; tests/test_docs.py checks
the quotes. A header no longer in its file is an error: the table's columns changed, quote it again by hand.

Usage: ``python scripts/quote_results.py`` (from anywhere; prints the files it changed).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results: (\S+) -->\n)(.*?)(<!-- /results -->)", re.DOTALL)


def _is_separator(line: str) -> bool:
    return re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line) is not None


def table_with_header(path: Path, header: str) -> list[str]:
    """The lines of the table in ``path`` whose first line is ``header`` (a table ends at a non-table line or
    where the next table's header and separator start)."""
    lines = path.read_text().splitlines()
    if header not in lines:
        raise SystemExit(f"{path.relative_to(REPO)} has no table with the header {header!r}")
    start = lines.index(header)
    end = start + 2
    while end < len(lines) and lines[end].startswith("|") and not (
        end + 1 < len(lines) and _is_separator(lines[end + 1])
    ):
        end += 1
    return lines[start:end]


def refresh(text: str) -> str:
    """``text`` with the first table of each results block replaced by its file's table of the same header;
    other lines of the block (a sentence quoted from the file) are left as they are."""

    def quote(match: re.Match) -> str:
        opening, path, body, closing = match.groups()
        lines = body.splitlines()
        start = next((index for index, line in enumerate(lines) if line.startswith("|")), None)
        if start is None:
            return match.group(0)
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[start:end] = table_with_header(REPO / path, lines[start])
        return opening + "\n".join(lines) + "\n" + closing

    return BLOCK.sub(quote, text)


def main() -> None:
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        new = refresh(text)
        if new != text:
            doc.write_text(new)
            print(doc.relative_to(REPO))


if __name__ == "__main__":
    sys.exit(main())
