"""The ``ssmkit`` command line: one subcommand per module in :mod:`ssmkit.commands`.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func=run`` with ``run(args) -> int``. Commands import their heavy dependencies inside ``run`` so
that ``ssmkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import ssmkit
import ssmkit.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssmkit", description="ssmkit: selective state space models (S4, Mamba-1, Mamba-2, hybrids)"
    )
    parser.add_argument("--version", action="version", version=f"ssmkit {ssmkit.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(ssmkit.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"ssmkit.commands.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
