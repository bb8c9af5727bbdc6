"""The ``raptor`` command line: a thin layer over the library.

Each concern registers its own subcommands (``register(subparsers)`` in the module named below),
so this file only wires them together and sets up logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module -> registers these subcommands
COMMAND_MODULES = [
    "raptor.data.cli",  # shards, data bench
    "raptor.discovery.cli",  # maxcut
    "raptor.train.cli",  # teacher train
    "raptor.pipeline_cli",  # run, submit
    "raptor.analysis.cli",  # analyze
    "raptor.deploy.cli",  # k8s render
]


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raptor", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (e.name == name or name.startswith(e.name + ".")):
                continue  # that concern is not installed in this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (CliError, ValueError, FileNotFoundError) as e:
        print(f"raptor {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
