"""The error types the ``raptor`` command shows as one line (exit code 2): the user's to fix.

Anything else is a bug or an outage and keeps its traceback (exit code 1), so an internal error is
never disguised as bad input. Leaf module: every layer may raise these without importing the CLI.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input (a spec field, an argument, a file the user pointed at): one line naming it."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder or dataset the user named does not exist (still a FileNotFoundError to library callers)."""
