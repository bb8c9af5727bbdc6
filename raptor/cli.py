"""The ``raptor`` command line: a thin layer over the library.

Each concern registers its own subcommands (``register(subparsers)`` in the module named below),
so this file only wires them together and sets up logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (module whose ``register(subparsers)`` defines it, one-line help). Only the module of
# the command being run is imported, so ``raptor k8s render`` or ``--help`` never pays for torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("raptor.data.cli", "write WebDataset shards (folder or s3:// URL)"),
    "data": ("raptor.data.cli", "data tools (bench)"),
    "maxcut": ("raptor.discovery.cli", "max-cut block boundaries from a layer-distance matrix"),
    "teacher": ("raptor.train.cli", "teacher models (train)"),
    "run": ("raptor.pipeline_cli", "run a job spec: data -> teacher -> discovery -> stage1 -> stage2 -> probe -> report"),
    "submit": ("raptor.pipeline_cli", "submit `raptor run SPEC` to a Ray cluster as a Ray job"),
    "analyze": ("raptor.analysis.cli", "dynamics and probe report of a finished run"),
    "k8s": ("raptor.deploy.cli", "Kubernetes (KubeRay) manifests generated from a job spec"),
}


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser of ``command`` (its module registers it); the others as help-only stubs."""
    parser = argparse.ArgumentParser(prog="raptor", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(sub)
    for name, (_, help_text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_of(argv)).parse_args(argv)
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
