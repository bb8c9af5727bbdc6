"""The data layer's user errors (one line, exit code 2 from the ``raptor`` command)."""

from __future__ import annotations

from raptor.errors import UserError


class DatasetError(UserError):
    """A dataset's files do not say what the loader needs (bad info file, unknown split, ...);
    a dataset that is not there at all is :class:`raptor.errors.MissingInput`."""
