"""Teach WebDataset to open shards on any fsspec filesystem (``s3://``, ``memory://``, ...).

WebDataset opens shard URLs through its own ``gopen_schemes`` table, which by default shells out to
``curl``/``gsutil`` or knows nothing of ``s3://``. Registering an fsspec-backed handler here routes
every such URL through :mod:`raptor.storage`, so the endpoint and credentials come from the standard
AWS variables like everything else. The registration runs when this module is imported, and
:mod:`raptor.data.streaming` imports it, so DataLoader workers get it whether they fork or spawn.
"""

from __future__ import annotations

import logging
import time
from typing import IO, Any

import fsspec
from webdataset.gopen import gopen, gopen_schemes

from raptor import storage

log = logging.getLogger(__name__)

# WebDataset handles these itself (local files natively; the rest with its own tools, kept as is).
_KEEP = {"file", "local", "pipe"}


def _transient_errors() -> tuple[type[BaseException], ...]:
    """OSError, plus the connection errors of the object-store clients that are installed: s3fs
    retries a broken connection itself, then lets botocore's error (not an OSError) through."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError

        errors.append(BotoCoreError)
    except ImportError:
        pass
    try:
        from aiohttp import ClientError

        errors.append(ClientError)
    except ImportError:
        pass
    return tuple(errors)


# Errors of a stream that is readable again once the network or the object store recovers.
TRANSIENT = _transient_errors()


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    """WebDataset ``gopen`` handler: open ``url`` through fsspec."""
    return storage.open_file(url, mode)


def register() -> None:
    """Route every fsspec protocol WebDataset has no handler for through :func:`gopen_fsspec`
    (the known ones and any registered at run time)."""
    for proto in {*fsspec.available_protocols(), *fsspec.registry}:
        if proto not in _KEEP and proto not in gopen_schemes:
            gopen_schemes[proto] = gopen_fsspec


class ShardUnavailableError(RuntimeError):
    """A shard stayed missing or unreachable through all retries."""


def open_shard(url: str, *, retries: int = 3, backoff_s: float = 1.0) -> IO[bytes]:
    """Open a shard for streaming, retrying with exponential backoff before failing clearly.

    Object stores throw transient errors (throttling, resets, a freshly written object not yet
    listed), so a shard is tried ``retries + 1`` times, waiting ``backoff_s``, ``2*backoff_s``, ...
    in between; then :class:`ShardUnavailableError` names the shard and the last error.
    """
    attempt = 0
    while True:
        try:
            return gopen(url, "rb")
        except Exception as e:  # noqa: BLE001 - any failure to open is retried, then reported
            if attempt == retries:
                raise ShardUnavailableError(
                    f"shard {url} could not be opened after {retries + 1} tries: "
                    f"{type(e).__name__}: {e}"
                ) from e
            wait_before_retry(f"opening shard {url}", e, attempt, backoff_s)
            attempt += 1


def wait_before_retry(what: str, error: BaseException, attempt: int, backoff_s: float) -> None:
    """Log a transient failure and sleep ``backoff_s * 2**attempt`` before the next try."""
    wait = backoff_s * 2**attempt
    log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(error).__name__, error, wait)
    time.sleep(wait)


register()
