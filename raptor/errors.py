"""The error types the ``raptor`` command shows as one line: the user's to fix, or a run that stopped.

Anything else is a bug: its traceback is printed and the exit code is 1, so an internal error is
never disguised as bad input. Leaf module: every layer may raise these without importing the CLI.

- :class:`UserError` (exit code 2): bad input, named in one line.
- :class:`RunStopped` (exit code 3): the run stopped on purpose, for a reason outside the code (an
  object store unreachable past ``storage.patience``, a stage whose loss kept diverging), and left
  a state that a re-run resumes from.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input (a spec field, an argument, a file the user pointed at): one line naming it."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder or dataset the user named does not exist (still a FileNotFoundError to library callers)."""


class CorruptArtifact(UserError):
    """A stored file does not match the checksum recorded when it was written (truncated, bit-flipped, replaced)."""


class RunStopped(Exception):
    """A run that stopped with a resumable state; the message says why and what to do, in one line."""


class StorageUnavailable(RunStopped):
    """Object storage stayed unreachable for longer than the patience; nothing half-written counts as done."""


class TrainingDiverged(RunStopped):
    """Too many optimizer steps in a row had a non-finite loss or gradient; the stage stopped with a checkpoint."""
