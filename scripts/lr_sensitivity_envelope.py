"""The LR sensitivity of the best any arm reached at each learning rate of the wortsman2023 sweep (its envelope).

Reads the sweep's table (``docs/results/presets/wortsman2023.md``: every arm's final validation loss per LR),
takes at each LR the lowest loss over every arm, with and without qk-layernorm, and computes the LR sensitivity of
that envelope as ``examples/lr_sensitivity.py`` computes an arm's (Wortsman et al. 2023: the mean over the LRs of
the gap to the best LR; every loss here is below the first batch's, so the cap ``l0`` never applies). Compared with
clip 1.0's on the plain model, it says how low any stabiliser measured here could bring the plain model's LR
sensitivity without a lower learning rate. Writes ``benchmarks/results/wortsman2023-envelope.md``.

    python scripts/lr_sensitivity_envelope.py
"""

from __future__ import annotations

import argparse
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "docs/results/presets/wortsman2023.md"


def _sweep_machine() -> str:
    """The machine line of the sweep's table (``Machine: ...``), as the sweep wrote it."""
    for line in SOURCE.read_text().splitlines():
        if line.startswith("Machine:"):
            return line.removeprefix("Machine:").strip()
    return "a machine the table does not name"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else ():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def read_losses(path: Path) -> tuple[list[float], dict[str, list[float]]]:
    """The swept LRs and, per arm, its final losses in that order (from the sweep's results table)."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    lr_columns = [i for i, cell in enumerate(header) if cell.startswith("lr=")]
    lrs = [float(header[i][3:]) for i in lr_columns]
    arms = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if re.fullmatch(r"-+", cells[0]):
            continue
        arms[cells[0]] = [float(cells[i]) for i in lr_columns]
    return lrs, arms


def sensitivity(losses: list[float]) -> float:
    """Mean gap to the best loss over the LRs (no loss here exceeds the first batch's, so nothing is capped)."""
    best = min(losses)
    return sum(loss - best for loss in losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/wortsman2023-envelope.md")
    args = parser.parse_args()
    lrs, arms = read_losses(SOURCE)
    envelope = [min(losses[i] for losses in arms.values()) for i in range(len(lrs))]
    winners = [", ".join(arm for arm, losses in arms.items() if losses[i] == envelope[i]) for i in range(len(lrs))]
    reference = sensitivity(arms["clip1 model.qk_layernorm=False"])
    # the guard with qk-layernorm where it ends lower than on the plain model: the remedy applied where it helps
    plain_guard = arms["guard model.qk_layernorm=False"]
    combined = [min(a, b) for a, b in zip(plain_guard, arms["guard model.qk_layernorm=True"], strict=True)]
    rows = [
        "| curve | LR sensitivity | ÷ clip1 (plain) | " + " | ".join(f"lr={lr:g}" for lr in lrs) + " |",
        "|---|---|---|" + "---|" * len(lrs),
    ]
    for label, losses in (
        ("clip1, plain model", arms["clip1 model.qk_layernorm=False"]),
        ("guard, plain model", plain_guard),
        ("guard, the better of plain and qk-layernorm at each LR", combined),
        ("every arm's best at each LR (the envelope)", envelope),
    ):
        value = sensitivity(losses)
        rows.append(
            f"| {label} | {value:.4f} | {value / reference:.2f} | " + " | ".join(f"{x:.3f}" for x in losses) + " |"
        )
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            "# wortsman2023: the LR sensitivity of the best any arm reached at each LR",
            "",
            "`python scripts/lr_sensitivity_envelope.py`",
            "",
            f"Date: {date}. Machine: {_cpu()} (arithmetic on the sweep's table, `{SOURCE.relative_to(REPO)}`, whose "
            f"runs were measured on: {_sweep_machine()}; its losses are rounded to 3 decimals, so the clip 1.0 "
            "and guard sensitivities differ from the sweep's own in the 4th).",
            "",
            *rows,
            "",
            "Best arm at each LR: " + "; ".join(f"lr={lr:g}: {w}" for lr, w in zip(lrs, winners, strict=True)) + ".",
            "",
        ]
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
