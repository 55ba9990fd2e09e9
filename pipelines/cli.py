"""``lmvic``: the command line. Subcommands live in ``pipelines/commands/``, one module each."""
from __future__ import annotations

import os

# OpenMP threads (torch's and the splatting kernels') sleep instead of spinning while they wait:
# spinning threads starve everything else when the CPU is shared, which made the 3DGS fit ~10x
# slower on a loaded 2-core machine. Must be set before torch (and libgomp) load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib  # noqa: E402
import logging
import pkgutil
import sys

import pipelines.commands
from lmvic.heap import retain_freed_memory
from pipelines.errors import LmvicError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmvic",
        description="Multi-view image compression with 3D Gaussian Splatting geometry, on the CPU.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(pipelines.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"pipelines.commands.{info.name}").register(subparsers)
    for sub in subparsers.choices.values():
        verbosity = sub.add_mutually_exclusive_group()
        verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
        verbosity.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s")
    retain_freed_memory()  # large tensors reuse freed pages (encode/decode ~30 % faster: lmvic.heap)
    try:
        return args.handler(args) or 0
    except LmvicError as exc:
        print(f"lmvic: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmvic: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
