"""Diagnose every model of the test zoo and write the results table (docs/results/zoo.md).

For each stock architecture, good-practice init and known-bad control (the first zoo and the wider one of
diagnosis v3): parameters, the findings of ``diagnose()`` (severity code (number of modules)), whether a control
got every code naming every module it must, the time of ``diagnose()`` and of one plain forward + backward of the
same model on the same batch, whose ratio is diagnose()'s cost (one thread), and any exception. Run from the
repository root:

    python scripts/zoo_table.py --output docs/results/zoo.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_gradstab import diagnose  # noqa: E402
from tests.zoo import BROKEN, CONTROLS, GOOD, STOCK  # noqa: E402
from tests.zoo.applied import APPLIED  # noqa: E402
from tests.zoo.wider import GOOD_WIDER, STOCK_WIDER  # noqa: E402


def _call(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def forward_backward_seconds(model: torch.nn.Module, batch: Any, repeats: int = 3) -> float:
    """Best of ``repeats`` plain forward + backward passes (random output direction, like diagnose's)."""
    return forward_backward_times(model, batch, repeats)[0]


def forward_backward_times(model: torch.nn.Module, batch: Any, repeats: int = 3) -> tuple[float, float]:
    """``(wall, thread CPU)`` seconds, each the best of ``repeats`` plain forward + backward passes."""
    from torch.utils._pytree import tree_leaves

    best, best_cpu = float("inf"), float("inf")
    model.train()
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        outputs = [t for t in tree_leaves(_call(model, batch)) if isinstance(t, torch.Tensor) and t.requires_grad]
        loss = sum((t.float() * torch.randn_like(t, dtype=torch.float32)).sum() for t in outputs)
        loss.backward()
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.thread_time() - start_cpu)
        model.zero_grad(set_to_none=True)
    return best, best_cpu


def diagnose_seconds(model: torch.nn.Module, batch: Any, repeats: int = 3) -> tuple[Any, float, float]:
    """``(report, wall, thread CPU)``: the seconds each the best of ``repeats`` calls of ``diagnose``."""
    best, best_cpu, report = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        report = diagnose(model, batch)
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.thread_time() - start_cpu)
    return report, best, best_cpu


def _control_found(entry: Any, report: Any) -> bool:
    """Whether a control got every expected code, each finding naming every module it must."""
    return all(
        code in report.codes and set(modules) <= {m for f in report.by_code(code) for m in f.modules}
        for code, modules in entry.expected.items()
    )


def _findings(report: Any) -> str:
    parts = [f"{f.severity} `{f.code}` ({len(f.modules)})" for f in report.findings]
    return ", ".join(parts) or "-"


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "zoo.md")
    parser.add_argument("--title", default="after")
    parser.add_argument("--note", default="", help="a line saying which code was measured, when not this tree's")
    parser.add_argument("--repeats", type=int, default=5, help="times are the best of this many runs, both sides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows: list[str] = []
    summary = {"stock": [0, 0, 0], "good": [0, 0, 0]}
    cited = uncited = exceptions = 0
    controls, found = 0, 0
    ratios: list[float] = []
    cpu_ratios: list[float] = []  # the same on the thread's CPU time: what other jobs on the machine do not inflate
    largest = (0, "", 0.0, 0.0)
    groups = (
        ("stock", STOCK + STOCK_WIDER),
        ("broken default", BROKEN),
        ("good", GOOD + GOOD_WIDER),
        ("control", CONTROLS + APPLIED),
    )
    for group, entries in groups:
        for entry in entries:
            note = getattr(entry, "fault", None) or entry.source
            reduced = getattr(entry, "reduced", "")
            try:
                model, batch = entry()
                parameters = sum(p.numel() for p in model.parameters())
                report, seconds, seconds_cpu = diagnose_seconds(model, batch, args.repeats)
                step, step_cpu = forward_backward_times(model, batch, args.repeats)
            except Exception as error:  # counted and shown: the table must say so
                exceptions += 1
                failure = f"exception {type(error).__name__}: {error}"
                rows.append(f"| {group} | {entry.name} | {note} | - | {failure} | - | - | - |")
                print(rows[-1], flush=True)
                continue
            ratios.append(seconds / step)
            cpu_ratios.append(seconds_cpu / step_cpu)
            expected = getattr(entry, "expected", {})
            if group in summary:
                summary[group][0] += 1
                summary[group][1] += sum(f.severity == "error" for f in report.findings)
                summary[group][2] += sum(f.severity == "warning" for f in report.findings)
                if group == "stock":
                    backed = [f.severity == "warning" and f.code in expected for f in report.findings]
                    cited += sum(backed)
                    uncited += sum(f.severity == "warning" for f in report.findings) - sum(backed)
            verdict = ""
            if group == "control":
                controls += 1
                hit = _control_found(entry, report)
                found += hit
                verdict = " - found, modules named" if hit else " - **missed**"
            if parameters > largest[0]:
                largest = (parameters, entry.name, seconds, step)
            why = "; ".join(
                f"`{code}` {text}" for code, text in expected.items() if isinstance(text, str) and code in report.codes
            )
            rows.append(
                f"| {group} | {entry.name} | {note}{' (' + reduced + ')' if reduced else ''} | {parameters:,} | "
                f"{_findings(report)}{verdict}{' - ' + why if why else ''} | {seconds:.3f} | {step:.3f} | "
                f"{seconds / step:.1f} |"
            )
            print(rows[-1], flush=True)
    ordered = sorted(ratios)
    median = ordered[len(ordered) // 2] if ordered else float("nan")
    ordered_cpu = sorted(cpu_ratios)
    median_cpu = ordered_cpu[len(ordered_cpu) // 2] if ordered_cpu else float("nan")
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import lightning
    import transformers

    lines = [
        f"# Diagnosis zoo ({args.title})",
        "",
        f"- command: `python scripts/zoo_table.py --output {_shown(args.output)}"
        f"{' --title ' + repr(args.title) if args.title != 'after' else ''}"
        f"{' --repeats ' + str(args.repeats) if args.repeats != 5 else ''}`",
        *([f"- code: {args.note}"] if args.note else []),
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu}, {torch.get_num_threads()} thread(s) of {len(__import__('os').sched_getaffinity(0))} cores",
        f"- versions: torch {torch.__version__}, lightning {lightning.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}",
        f"- times: best of {args.repeats} (wall clock); `fwd+bwd` is one plain forward + backward of the same model "
        "and batch; `ratio` = diagnose / fwd+bwd; the summary also gives the ratios of the thread's CPU time, "
        "which other jobs on a shared machine inflate less",
        "",
        f"Stock models: {summary['stock'][0]}, error-level findings {summary['stock'][1]}, warning-level findings "
        f"{summary['stock'][2]} ({cited} of them cited to a paper in the table, {uncited} not). Good-practice "
        f"inits: {summary['good'][0]}, errors {summary['good'][1]}, warnings {summary['good'][2]}. Bad controls: "
        f"{found} of {controls} found with their modules named. Exceptions: {exceptions}. diagnose() cost: median "
        f"{median:.2f}x, maximum {max(ratios, default=float('nan')):.2f}x one forward + backward (thread CPU time: "
        f"median {median_cpu:.2f}x, maximum {max(cpu_ratios, default=float('nan')):.2f}x). Largest model: "
        f"{largest[1]} ({largest[0]:,} parameters), diagnose {largest[2]:.3f} s = "
        f"{largest[2] / largest[3]:.1f}x one forward + backward ({largest[3]:.3f} s).",
        "",
        "| group | model | built from (reduced size) | parameters | findings (modules named) | diagnose s | "
        "fwd+bwd s | ratio |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
