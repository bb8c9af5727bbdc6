"""The ``raptor`` command line: a thin layer over the libraries and the service.

Each concern registers its own subcommands (``register(subparsers)`` in the module named below),
so this file only wires them together, sets up the console, and turns the user's errors
(:class:`raptor.errors.UserError`, bad arguments included) into one line with exit code 2, and a
run that stopped with a resumable state (:class:`raptor.errors.RunStopped`: storage unreachable past
its patience, a diverged stage) into one line with exit code 3. Anything else is a bug: its
traceback is printed and the exit code is 1. ``-v`` prints the traceback in every case.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from raptor import console
from raptor.errors import RunStopped, UserError

log = logging.getLogger(__name__)

# command -> (module whose ``register(subparsers)`` defines it, one-line help). Only the module of
# the command being run is imported, so ``raptor k8s render`` or ``--help`` never pays for torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("raptor.data.cli", "write WebDataset shards (folder or s3:// URL)"),
    "data": ("raptor.data.cli", "data tools (bench)"),
    "maxcut": ("raptor.discovery.cli", "max-cut block boundaries from a layer-distance matrix"),
    "run": ("raptor.service.cli", "run a job spec: data -> teacher -> discovery -> stage1 -> stage2 -> probe -> report -> export"),
    "plan": ("raptor.service.cli", "per-GPU memory and throughput of a spec's training stages; what makes it fit"),
    "sweep": ("raptor.service.cli", "run the spec's sweep section as a Ray Tune sweep: one pipeline per trial, one shared store"),
    "submit": ("raptor.service.cli", "submit `raptor run SPEC` (or `raptor sweep SPEC`) to a Ray cluster as a Ray job"),
    "teacher": ("raptor.service.cli", "teacher models (train)"),
    "analyze": ("raptor.service.cli", "dynamics and probe report of a finished run"),
    "export": ("raptor.service.cli", "the student as a self-contained model: a safetensors file, a Hugging Face folder, ONNX"),
    "bench-model": ("raptor.export.cli", "inference of an exported student against its teacher: images/s and peak memory"),
    "k8s": ("raptor.service.cli", "Kubernetes (KubeRay) manifests generated from a job spec"),
}


class Parser(argparse.ArgumentParser):
    """argparse with the errors of every raptor command: one line naming the argument, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser of ``command`` (its module registers it); the others as help-only stubs."""
    parser = Parser(prog="raptor", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything on the console: debug logging, Ray's and DeepSpeed's own messages")
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
    console.setup(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        log.debug("the error's traceback", exc_info=True)
        print(f"raptor {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except RunStopped as e:
        log.debug("the stop's traceback", exc_info=True)
        print(f"raptor {args.command}: stopped: {_one_line(e)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"raptor {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
