"""``raptor ARGV`` run in the test's own process (fast: no interpreter start, torch already imported)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from raptor.cli import main


def run_cli(argv: list[str], cwd: Path | str | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``raptor ARGV`` in ``cwd``, leaving the root logger as it was
    (``main`` installs the console on it)."""
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    where = contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext()
    with where, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        finally:
            root.handlers[:], root.level = handlers, level
            logging.captureWarnings(False)
    return code, out.getvalue(), err.getvalue()
