"""The ``gradstab`` console script: ``gradstab audit package.module:factory --input-shape 32,64``.

Builds the model with ``factory()``, diagnoses it on a random batch of the given shape (or on the batch the
factory returns with it: ``factory() -> (model, batch)``, a tensor, tuple or dict such as Hugging Face's
``{"input_ids": ...}``), prints the findings table and writes the JSON report. The exit status makes it a CI
gate, so each cause has its own: 0 without error-level findings, 1 with at least one (and only then), 2 for
usage errors (bad target, shape or output path), 3 when the factory, the model or its forward raised (or the
model could not be probed). Every failure is one line on stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_MODEL = 0, 1, 2, 3
EXIT_STATUS_HELP = (
    "Exit status: 0 no error-level finding; 1 error-level findings; 2 usage error (bad target, --input-shape, "
    "--json path); 3 the factory, the model or its forward raised, or the model could not be probed."
)
BATCH_MEMORY_SHARE = 0.5
"""A random batch may take at most this share of the host's available RAM (a bigger ``--input-shape`` is a usage
error, said before anything is allocated)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``gradstab: error: ...``) with exit status 2, not the usage block."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--input-shape must be comma-separated positive ints, got {text!r}"
        ) from error
    if not shape or any(size <= 0 for size in shape):
        raise argparse.ArgumentTypeError(f"--input-shape must be comma-separated positive ints, got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gradstab`` (exposed for documentation and tests)."""
    parser = _Parser(
        prog="gradstab", description="Gradient-stability tools for PyTorch models.", epilog=EXIT_STATUS_HELP
    )
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser(
        "audit",
        help="diagnose init, signal propagation and architecture of a model on a random batch; writes the "
        "findings to gradstab_audit.json (see --json)",
        description=EXIT_STATUS_HELP,
    )
    audit.add_argument(
        "target",
        help="model factory as 'package.module:callable' (called with no arguments); it returns the model, or "
        "(model, batch) with a real batch: a tensor, a tuple of arguments or a dict of keyword arguments",
    )
    audit.add_argument(
        "--input-shape", type=_shape, default=None,
        help="shape of a random batch, e.g. 32,64 or 8,3,32,32 (required unless the factory returns a batch)",
    )
    audit.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="feed integer token ids in [0, vocab-size) instead of N(0, 1) floats (embedding models)",
    )
    audit.add_argument(
        "--json", type=Path, default=Path("gradstab_audit.json"),
        help="where to write the JSON report (default: gradstab_audit.json in the current directory)",
    )
    audit.add_argument(
        "--quiet", action="store_true",
        help="print nothing (no table, no path); the JSON report is still written and the exit status is the "
        "same. The callbacks' equivalent is lightning_gradstab.set_verbosity('quiet') or GRADSTAB_VERBOSITY=quiet",
    )
    audit.add_argument("--seed", type=int, default=0, help="seed of the random batch and the probe direction")
    audit.add_argument(
        "--debug", action="store_true", help="let an error raise with its traceback instead of one line"
    )
    return parser


def _load_factory(target: str) -> Callable[[], object]:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"target must look like 'package.module:factory', got {target!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`: modules next to the user's files import
    module = importlib.import_module(module_name)
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"{target!r} is not callable")
    return factory


def _random_batch(args: argparse.Namespace) -> torch.Tensor:
    if args.input_shape is None:
        raise ValueError("--input-shape is required when the factory returns only a model")
    from lightning_gradstab.guard.snapshot_budget import format_bytes, host_memory_bytes

    element_bytes = 8 if args.vocab_size is not None else 4
    nbytes = math.prod(args.input_shape) * element_bytes
    room = BATCH_MEMORY_SHARE * host_memory_bytes()[1]
    if nbytes > room:
        raise ValueError(
            f"--input-shape {','.join(map(str, args.input_shape))} is a batch of {format_bytes(nbytes)}, above "
            f"{format_bytes(room)} (half of this host's available memory); pass a smaller shape"
        )
    generator = torch.Generator().manual_seed(args.seed)
    if args.vocab_size is not None:
        if args.vocab_size < 1:
            raise ValueError(f"--vocab-size must be a positive int, got {args.vocab_size}")
        return torch.randint(0, args.vocab_size, args.input_shape, generator=generator)
    return torch.randn(args.input_shape, generator=generator)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gradstab``; returns the exit status (0 clean, 1 error-level findings, 2 usage error, 3 the factory,
    the model or its forward raised or could not be probed).

    Example::

        gradstab audit mypackage.models:build_mlp --input-shape 32,64 --json audit.json
        gradstab audit mypackage.models:bert_and_batch    # factory returns (model, {"input_ids": ...})
    """
    args = build_parser().parse_args(argv)
    from lightning_gradstab.console import set_verbosity
    from lightning_gradstab.diagnosis import diagnose

    if not args.quiet:
        return _audit(args, diagnose)
    previous = set_verbosity("quiet")
    try:
        return _audit(args, diagnose)
    finally:
        set_verbosity(previous)


def _audit(args: argparse.Namespace, diagnose: Any) -> int:
    """Build, diagnose, print (unless quiet) and write the report; the exit status."""
    from lightning_gradstab.console import console_print

    if args.json.is_dir() or (args.json.parent.exists() and not args.json.parent.is_dir()):
        return _fail(f"--json {str(args.json)!r} is not a file path (a directory is there, or its folder is a file)")
    try:
        factory = _load_factory(args.target)
    except (ImportError, AttributeError, ValueError) as error:
        return _fail(f"{error}", EXIT_USAGE, error, args.debug)
    except Exception as error:  # the module itself raised while being imported
        return _fail(f"importing {args.target!r} raised {_describe(error)}", EXIT_MODEL, error, args.debug)
    try:
        built = factory()
    except Exception as error:
        return _fail(f"the factory {args.target!r} raised {_describe(error)}", EXIT_MODEL, error, args.debug)
    model, batch = built if isinstance(built, tuple) and len(built) == 2 else (built, None)
    if not isinstance(model, nn.Module):
        return _fail(f"{args.target} returned {type(built).__name__}, expected a torch.nn.Module or (module, batch)")
    try:
        if batch is None or args.input_shape is not None:
            batch = _random_batch(args)
    except ValueError as error:
        return _fail(str(error), EXIT_USAGE, error, args.debug)
    try:
        report = diagnose(model, batch, seed=args.seed)
    except Exception as error:
        return _fail(f"the model could not be probed: {_describe(error)}", EXIT_MODEL, error, args.debug)
    report.print()
    try:
        path = report.write_json(args.json)
    except OSError as error:
        message = f"cannot write --json {str(args.json)!r}: {error.strerror or error}"
        return _fail(message, EXIT_USAGE, error, args.debug)
    console_print(f"JSON report written to {path}")
    if any(f.evidence.get("probe_failed") for f in report.by_code("trace.incomplete")):  # ran, but unprobed
        return EXIT_MODEL
    return EXIT_FINDINGS if report.has_errors else EXIT_OK


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _fail(message: str, status: int = EXIT_USAGE, error: BaseException | None = None, debug: bool = False) -> int:
    """Say ``message`` on one line of stderr and return ``status``; with ``--debug`` raise ``error`` instead."""
    if debug and error is not None:
        raise error
    line = " ".join(message.split())  # one line, whatever the message holds
    hint = " (--debug shows the traceback)" if error is not None and status == EXIT_MODEL else ""
    print(f"gradstab audit: {line}{hint}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
