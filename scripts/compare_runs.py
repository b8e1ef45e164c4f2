"""Compare two runs of ``benchmarks/divergence.py`` run by run: did a change move any decision?

A rule change that should act only in rare situations (a repeated batch, a ceiling that expires) is checked by
running the benchmark at the new code and comparing every run that both files hold, keyed by task, method, seed and
perturbation: its status, final loss, task metric, LR multiplier and the guard's action counts. Identical runs are
counted; every difference is listed. Run from the repository root:

    python scripts/compare_runs.py benchmarks/results/divergence-cpu-v6.json new.json --output identity.md

Example::

    differences, same = compare(load_runs(Path("old.json")), load_runs(Path("new.json")))
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Any

RunKey = tuple[str, str, int, float]


def load_runs(path: Path) -> dict[RunKey, dict[str, Any]]:
    """The runs of one results JSON file (``benchmarks/divergence.py --out``), keyed by task, method, seed and
    perturbation."""
    runs = json.loads(path.read_text())["runs"]
    return {(r["task"], r["method"], int(r["seed"]), float(r.get("perturb") or 0.0)): r for r in runs}


def outcome(run: dict[str, Any]) -> dict[str, Any]:
    """What a run ended with: status, final loss, metric, LR multiplier and action counts."""
    actions = run.get("actions") or {}
    return {
        "status": run.get("status"),
        "final_loss": run.get("final_loss"),
        "metric": run.get("metric"),
        "lr_scale": actions.get("lr_scale"),
        "counts": actions.get("counts") or {},
    }


def compare(
    old: dict[RunKey, dict[str, Any]], new: dict[RunKey, dict[str, Any]]
) -> tuple[list[tuple[RunKey, dict[str, Any], dict[str, Any]]], int]:
    """``(differences, same)`` over the runs both hold: each difference with the old and the new outcome."""
    differences, same = [], 0
    for key in sorted(old.keys() & new.keys()):
        before, after = outcome(old[key]), outcome(new[key])
        if before == after:
            same += 1
        else:
            differences.append((key, before, after))
    return differences, same


def _changed(before: dict[str, Any], after: dict[str, Any]) -> str:
    fields = [name for name in before if name != "counts" and before[name] != after[name]]
    parts = [f"{name} {before[name]!r} -> {after[name]!r}" for name in fields]
    counts_before, counts_after = before["counts"], after["counts"]
    for name in sorted(counts_before.keys() | counts_after.keys()):
        if counts_before.get(name) != counts_after.get(name):
            parts.append(f"{name} {counts_before.get(name, 0)} -> {counts_after.get(name, 0)}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", type=Path, help="OLD.json NEW.json [OLD.json NEW.json ...]")
    parser.add_argument("--output", type=Path, help="write the comparison as markdown here")
    parser.add_argument("--title", default="Run-by-run comparison of two benchmark runs")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error(f"pairs: give OLD.json NEW.json pairs, got {len(args.pairs)} paths")
    lines = [
        f"# {args.title}",
        "",
        f"- command: `python scripts/compare_runs.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "| old | new | new run's machine and code | runs identical | runs that differ |",
        "|---|---|---|---|---|",
    ]
    details: list[str] = []
    for old_path, new_path in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        differences, same = compare(load_runs(old_path), load_runs(new_path))
        made = json.loads(new_path.read_text()).get("machine") or {}
        where = f"{made.get('cpu', '?')}, {made.get('cores', '?')} cores; {made.get('commit', '?')}"
        lines.append(f"| `{old_path}` | `{new_path}` | {where} | {same} | {len(differences)} |")
        details += [f"- {'/'.join(map(str, key))}: {_changed(before, after)}" for key, before, after in differences]
    text = "\n".join(lines + (["", *details] if details else [])) + "\n"
    print(text, end="")
    if args.output is not None:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
