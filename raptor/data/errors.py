"""The data layer's user errors (one line, exit code 2 from the ``raptor`` command)."""

from __future__ import annotations

from raptor.errors import UserError


class DatasetError(UserError):
    """A dataset's files do not say what the loader needs (bad info file, unknown split, ...)."""


class DatasetNotFound(DatasetError, FileNotFoundError):
    """No dataset where the URL points (still a FileNotFoundError for callers that catch it)."""
