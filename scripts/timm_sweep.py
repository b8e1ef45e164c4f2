"""Robustness sweep of ``diagnose()`` on timm's image models at random init: one model per timm model module.

timm (``pytorch-image-models``) holds ~100 families of published vision architectures with their authors' inits
(ResNets, NFNets, EfficientNets, ConvNeXts, ViTs and their hybrids, MLP-Mixers, MetaFormers, Swin, MaxViT, ...);
none of them is in the test zoo, and no rule was written with them at hand. For every model module the smallest
variant is built at random init (``pretrained=False``, 10 classes; nothing is downloaded), run once plainly on a
batch of 2 images of its default input size, then through ``diagnose(model, images)``. One JSON line per model
goes to the results file (module, model, parameters, input, seconds of diagnose and of one plain forward +
backward, every finding with its modules and evidence, or the exception); ``run`` writes the Markdown summary
next to it at the end (same stem, ``.md``) and ``summary`` rewrites it from the results file.

timm's model code does not use torchvision, but ``import timm`` imports its data transforms, which import
torchvision at import time; the torchvision wheel does not load beside the CPU build of torch used here. When
``import torchvision`` fails, the sweep installs an import stub for it (an empty package whose attributes are empty
packages), which only those transforms touch. Install timm without its dependencies:
``pip install --no-deps timm`` (its other requirements come with ``transformers``).

    OMP_NUM_THREADS=1 python scripts/timm_sweep.py run [--out FILE.jsonl] [--only MODULE,MODULE] [--models NAME,...]
    python scripts/timm_sweep.py summary [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.machinery
import json
import platform
import re
import shlex
import sys
import time
import types
from pathlib import Path
from typing import Any

from sweep_records import cpu_name, diagnose_into  # scripts/sweep_records.py: run as python scripts/<name>.py

DEFAULT_OUT = Path("benchmarks/results/timm-sweep.jsonl")
LARGEST_INPUT = 336 * 336
"""Models whose default input has more pixels are built at 224x224 when they take ``img_size``, else skipped."""
SIZE_TAGS = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "s", "b0", "18", "lite0", "light",
             "mini", "micro", "050", "035", "100", "base")
"""Variant names are ranked by the first of these tags they contain (then by length): the smallest variant."""


class _EmptyPackage(types.ModuleType):
    """A stand-in package: every attribute is another empty package (``torchvision.transforms.functional``)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        module = _EmptyPackage(f"{self.__name__}.{name}")
        module.__path__ = []
        sys.modules[module.__name__] = module
        setattr(self, name, module)
        return module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object,)


class _StubFinder:
    """Finds ``torchvision`` and its submodules as empty packages."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _EmptyPackage(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def import_timm() -> tuple[Any, bool]:
    """``(timm, stubbed)``: timm, imported with the torchvision stub when torchvision itself fails to import."""
    try:
        import torchvision  # noqa: F401
        stubbed = False
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StubFinder())
        stubbed = True
    import timm

    return timm, stubbed


def _rank(name: str) -> tuple[int, int, int]:
    test = int(name.startswith("test_"))  # timm's test configs are no published model: last resort
    for index, tag in enumerate(SIZE_TAGS):
        if re.search(rf"(^|_){tag}($|_|\d)", name) or tag in name:
            return (test, index, len(name))
    return (test, len(SIZE_TAGS), len(name))


def candidates(timm: Any) -> dict[str, str]:
    """Model module -> the smallest variant's name."""
    from timm.models import _registry

    by_module: dict[str, list[str]] = {}
    for name in timm.list_models():
        by_module.setdefault(_registry._model_to_module[name], []).append(name)
    return {module: min(names, key=_rank) for module, names in sorted(by_module.items())}


def _plain_step(model: Any, images: Any) -> float:
    import torch

    start = time.perf_counter()
    output = model(images)
    (output.float() * torch.randn(output.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def run_one(timm: Any, module: str, name: str) -> dict[str, Any]:
    """Build one model, run it plainly, diagnose it: its JSON record."""
    import torch


    row: dict[str, Any] = {"module": module, "model": name}
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10)
        size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
        if size[1] * size[2] > LARGEST_INPUT:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=10, img_size=224)
            size = (size[0], 224, 224)
        images = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["input"] = list(images.shape)
        model.train()
        _plain_step(model, images)  # a model that cannot run plainly is no finding of diagnose
    except Exception as error:
        row["build_error"] = f"{type(error).__name__}: {error}"[:300]
        return row
    if diagnose_into(row, model, images) is not None:
        row["plain_s"] = _plain_step(model, images)
    return row


def run(out: Path, only: set[str] | None, models: list[str] | None) -> None:
    import torch

    torch.set_num_threads(1)
    timm, stubbed = import_timm()
    chosen = candidates(timm)
    if only:
        chosen = {m: n for m, n in chosen.items() if m in only}
    if models:
        from timm.models import _registry

        chosen.update({f"{_registry._model_to_module[n]}:{n}": n for n in models})
    done: set[str] = set()
    if out.exists():
        done = {json.loads(line)["module"] for line in out.read_text().splitlines() if line.strip()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as sink:
        for module, name in chosen.items():
            if module in done:
                continue
            row = run_one(timm, module, name)
            row["timm"], row["torchvision_stub"] = timm.__version__, stubbed
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            shown = [f"{f['severity']} {f['code']}" for f in row.get("findings", []) if f["severity"] != "info"]
            print(module, name, row.get("build_error") or row.get("exception") or shown, flush=True)
            gc.collect()
    write_summary(out, shlex.join(["python", *sys.argv]))


def write_summary(out: Path, command: str, code: str | None = None) -> Path:
    """Write ``out`` with the suffix ``.md``: counts, findings per code, every model with a warning or an error
    (``code``: a line saying which code ran, when not this checkout's)."""
    import torch

    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    built = [r for r in rows if "build_error" not in r]
    diagnosed = [r for r in built if "findings" in r]
    counts: dict[tuple[str, str], list[int]] = {}
    for row in diagnosed:
        for finding in row["findings"]:
            entry = counts.setdefault((finding["severity"], finding["code"]), [0, 0])
            entry[0] += 1
    for (severity, kind), entry in counts.items():
        entry[1] = sum(any(f["severity"] == severity and f["code"] == kind for f in r["findings"]) for r in diagnosed)
    ratios = sorted(r["diagnose_s"] / r["plain_s"] for r in diagnosed if r.get("plain_s"))
    versions = {r.get("timm") for r in rows} - {None}
    lines = [
        "# diagnose() on timm's image models at random init",
        "",
        f"* Command: `{command}`",
        f"* Results: `{out.name}` (one JSON line per model)",
        *([f"* Code: {code}"] if code else []),
        f"* Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"* Machine: {cpu_name()}, one thread; Python {platform.python_version()}, torch {torch.__version__}, "
        f"timm {', '.join(sorted(versions))} (torchvision import stub: "
        f"{'yes' if any(r.get('torchvision_stub') for r in rows) else 'no'})",
        "",
        "## Counts",
        "",
        f"* Models: {len(rows)}, one per timm model module (its smallest variant) for "
        f"{sum(':' not in r['module'] for r in rows)} modules, and {sum(':' in r['module'] for r in rows)} named "
        "with `--models` (listed as module:model)",
        f"* Built and run plainly (batch of 2 at the default input size, 224x224 where that is above 336x336): "
        f"{len(built)}; could not build: {len(rows) - len(built)}",
        f"* diagnose exceptions: {len(built) - len(diagnosed)}",
    ]
    if ratios:
        lines.append(
            f"* diagnose() cost (diagnose / one plain forward + backward, one run each, after a warm-up step): "
            f"median {ratios[len(ratios) // 2]:.2f}, max {ratios[-1]:.2f}"
        )
    lines += ["", "## Findings", "", "| severity | code | findings | models |", "|---|---|---:|---:|"]
    order = {"error": 0, "warning": 1, "info": 2}
    for (severity, kind), (findings, models) in sorted(counts.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        lines.append(f"| {severity} | `{kind}` | {findings} | {models} |")
    flagged = [r for r in diagnosed if any(f["severity"] != "info" for f in r["findings"])]
    lines += ["", f"## Models with a warning or an error: {len(flagged)}", "",
              "| module | model | parameters | findings (first modules) |", "|---|---|---:|---|"]
    for row in flagged:
        shown = "<br>".join(
            f"{f['severity']} `{f['code']}` ({', '.join(f['modules'][:3])}{', ...' if len(f['modules']) > 3 else ''})"
            for f in row["findings"] if f["severity"] != "info"
        )
        lines.append(f"| {row['module']} | {row['model']} | {row['parameters']:,} | {shown} |")
    failed = [r for r in rows if "build_error" in r] + [r for r in built if "exception" in r]
    if failed:
        lines += ["", "## Could not build, or diagnose raised", ""]
        lines += [f"* {r['module']} ({r['model']}): {r.get('build_error') or r.get('exception')}" for r in failed]
    target = out.with_suffix(".md")
    target.write_text("\n".join(lines) + "\n")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="diagnose the models (resumes an existing results file)")
    run_parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    run_parser.add_argument("--only", help="comma-separated timm model modules")
    run_parser.add_argument("--models", help="comma-separated timm model names, run besides the modules' choice")
    summary_parser = commands.add_parser("summary", help="rewrite FILE.md from FILE.jsonl")
    summary_parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    summary_parser.add_argument("--code", help="which code ran, when not this checkout's (a commit)")
    args = parser.parse_args(argv)
    if args.command == "run":
        only = set(args.only.split(",")) if args.only else None
        run(args.out, only, args.models.split(",") if args.models else None)
    else:
        print(write_summary(args.out, shlex.join(["python", *sys.argv]), args.code))


if __name__ == "__main__":
    main()
