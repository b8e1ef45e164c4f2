"""The ``gradstab`` console script: ``gradstab audit package.module:factory --input-shape 32,64``.

Builds the model with ``factory()``, diagnoses it on a random batch of the given shape (or on the batch the
factory returns with it: ``factory() -> (model, batch)``, a tensor, tuple or dict such as Hugging Face's
``{"input_ids": ...}``), prints the findings table and writes the JSON report. The exit status makes it a CI
gate: 0 without error-level findings, 1 with at least one, 2 for usage errors (bad target, shape or model).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


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
    parser = argparse.ArgumentParser(prog="gradstab", description="Gradient-stability tools for PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser(
        "audit",
        help="diagnose init, signal propagation and architecture of a model on a random batch",
        description="Exit status: 0 no error-level finding, 1 error-level findings, 2 usage error.",
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
    audit.add_argument("--json", type=Path, default=Path("gradstab_audit.json"), help="where to write the JSON report")
    audit.add_argument("--seed", type=int, default=0, help="seed of the random batch and the probe direction")
    return parser


def _load_factory(target: str) -> object:
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
    generator = torch.Generator().manual_seed(args.seed)
    if args.vocab_size is not None:
        if args.vocab_size < 1:
            raise ValueError(f"--vocab-size must be a positive int, got {args.vocab_size}")
        return torch.randint(0, args.vocab_size, args.input_shape, generator=generator)
    return torch.randn(args.input_shape, generator=generator)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gradstab``; returns the exit status (0 clean, 1 error-level findings, 2 usage error).

    Example::

        gradstab audit mypackage.models:build_mlp --input-shape 32,64 --json audit.json
        gradstab audit mypackage.models:bert_and_batch    # factory returns (model, {"input_ids": ...})
    """
    args = build_parser().parse_args(argv)
    from lightning_gradstab.diagnosis import diagnose

    try:
        factory = _load_factory(args.target)
        built = factory()
        model, batch = built if isinstance(built, tuple) and len(built) == 2 else (built, None)
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"{args.target} returned {type(built).__name__}, expected a torch.nn.Module or (module, batch)"
            )
        if batch is None or args.input_shape is not None:
            batch = _random_batch(args)
        report = diagnose(model, batch, seed=args.seed)
    except (ImportError, AttributeError, ValueError, TypeError) as error:
        print(f"gradstab audit: {error}", file=sys.stderr)
        return EXIT_USAGE
    report.print()
    path = report.write_json(args.json)
    print(f"JSON report written to {path}")
    return EXIT_FINDINGS if report.has_errors else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
