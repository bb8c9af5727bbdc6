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
from raptor.errors import StorageUnavailable

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


class ShardUnreachable(ShardUnavailableError, StorageUnavailable):
    """The object store stayed unreachable past ``storage.patience`` while a shard was read: as for every
    other artifact, the run stops in one line, resumable once the store is back."""


def keep_trying(error: BaseException, attempt: int, retries: int, since: float) -> bool:
    """Whether a failed shard access is tried again: ``retries`` times for any error, and beyond that while
    the object store is unreachable (a refused or reset connection, not a missing shard) for less than
    ``storage.patience`` seconds since ``since`` (the streak's first failure), as every other store access
    waits out an outage. Raises :class:`ShardUnreachable` when that patience is spent."""
    if attempt < retries:
        return True
    if not isinstance(error, storage.transient_errors()):
        return False
    waited = time.monotonic() - since
    if waited < storage.patience():
        return True
    raise ShardUnreachable(f"object storage unreachable for {waited:.0f}s (storage.patience) while reading shards "
                           f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); the run "
                           "can be resumed once it is back") from error


def open_shard(url: str, *, retries: int = 3, backoff_s: float = 1.0) -> IO[bytes]:
    """Open a shard for streaming, retrying with exponential backoff before failing clearly.

    Object stores throw transient errors (throttling, resets, a freshly written object not yet
    listed), so a shard is tried ``retries + 1`` times, waiting ``backoff_s``, ``2*backoff_s``, ...
    in between, and for as long as ``storage.patience`` allows while the store is unreachable
    (:func:`keep_trying`); then :class:`ShardUnavailableError` names the shard and the last error.
    """
    attempt, since = 0, time.monotonic()
    while True:
        try:
            return gopen(url, "rb")
        except Exception as e:  # noqa: BLE001 - any failure to open is retried, then reported
            if not keep_trying(e, attempt, retries, since):
                raise ShardUnavailableError(
                    f"shard {url} could not be opened after {attempt + 1} tries: "
                    f"{type(e).__name__}: {e}"
                ) from e
            wait_before_retry(f"opening shard {url}", e, attempt, backoff_s)
            attempt += 1


def wait_before_retry(what: str, error: BaseException, attempt: int, backoff_s: float) -> None:
    """Log a transient failure and sleep ``backoff_s * 2**attempt`` (at most 30 s) before the next try."""
    wait = min(backoff_s * 2**attempt, 30.0)
    log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(error).__name__, error, wait)
    time.sleep(wait)


register()
