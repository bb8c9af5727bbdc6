"""One small helper for object storage: every artifact, shard, checkpoint and report goes through it.

Paths are plain local paths or any fsspec URL (``s3://bucket/key``, ``file://``, ``memory://``).
S3 endpoint and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), which s3fs/botocore read themselves, so a MinIO, Ceph or moto server
works by setting ``AWS_ENDPOINT_URL``.

An object store blips: every call here that talks to it is retried with exponential backoff while
the error is a transient one (the connection, not the request: :func:`transient_errors`), for up to
:func:`patience` seconds (``storage.patience`` in a job spec), then fails with
:class:`~raptor.errors.StorageUnavailable`. Writes are whole-object, so a retried write never leaves
a torn file. :func:`recording` collects the sha256 of every file written, as it is written, so an
artifact's checksums come from the bytes that were meant to be stored, not from a read-back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import IO, Any, Callable, Iterator, TypeVar

import fsspec
from fsspec.core import url_to_fs

from raptor.errors import CorruptArtifact, StorageUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PATIENCE_S = 600.0
_patience_s = DEFAULT_PATIENCE_S
_MAX_DELAY_S = 30.0


def set_patience(seconds: float) -> None:
    """How long this process keeps retrying an unreachable object store before it gives up."""
    global _patience_s
    if not seconds > 0:
        raise ValueError(f"patience must be > 0 seconds, got {seconds}")
    _patience_s = float(seconds)


def patience() -> float:
    return _patience_s


@cache
def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors after which the same call can succeed: a refused, reset or timed-out connection.

    Not ``FileNotFoundError``, ``PermissionError`` or a missing credential: retrying those only
    delays the real message. botocore's and aiohttp's connection errors are not ``OSError``s, so
    they are listed when their libraries are installed.
    """
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        errors += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError, ServerTimeoutError

        errors += [ClientConnectionError, ServerTimeoutError]
    except ImportError:
        pass
    return tuple(errors)


def retry(call: Callable[[], T], what: str, patience_s: float | None = None) -> T:
    """``call()``, retried with backoff (1 s, 2 s, ... 30 s) while it fails with a transient error.

    Past ``patience_s`` (default :func:`patience`) raises :class:`StorageUnavailable` naming
    ``what`` and the last error. The first failure and the recovery are logged as warnings.
    """
    start = time.monotonic()
    deadline = start + (patience() if patience_s is None else patience_s)
    delay, failures = 1.0, 0
    while True:
        try:
            result = call()
        except transient_errors() as e:
            failures += 1
            waited = time.monotonic() - start
            if time.monotonic() + delay > deadline:
                raise StorageUnavailable(
                    f"{what}: object storage unreachable for {waited:.0f}s (storage.patience); the run can be resumed "
                    f"once it is back ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                ) from e
            (log.warning if failures == 1 else log.info)(
                "%s failed (%s: %s); retrying in %.0fs", what, type(e).__name__, str(e).splitlines()[0] if str(e) else "", delay)
            time.sleep(delay)
            delay = min(2 * delay, _MAX_DELAY_S)
            continue
        if failures:
            log.warning("%s succeeded after %d retries (%.0fs)", what, failures, time.monotonic() - start)
        return result


# ---- checksums taken at write time
_written: ContextVar[dict[str, str] | None] = ContextVar("raptor_storage_written", default=None)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def recording() -> Iterator[dict[str, str]]:
    """``{url: sha256}`` of every file :func:`write_bytes` writes inside the block (this thread).

    Nested blocks also report to the enclosing one, so a stage's recording sees the files its
    helpers write.
    """
    outer = _written.get()
    files: dict[str, str] = {}
    token = _written.set(files)
    try:
        yield files
    finally:
        _written.reset(token)
        if outer is not None:
            outer.update(files)


def record(files: dict[str, str]) -> None:
    """Add checksums taken elsewhere (another process wrote the files) to the current recording."""
    current = _written.get()
    if current is not None:
        current.update(files)


def checksum(url: str, chunk: int = 8 << 20) -> str:
    """sha256 of a stored file, streamed (retried as a whole on a transient error)."""

    def digest() -> str:
        h = hashlib.sha256()
        with open_file(url, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        return h.hexdigest()

    return retry(digest, f"reading {url}")


# what identifies a stored object's content without reading it, in order of preference: the object
# store's entity tag (S3, Azure: changes with every upload of other bytes), GCS's generation and
# md5, else the modification time (local files, HTTP)
_VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "created")


def identity(urls: list[str]) -> str:
    """What a set of given files is, by content, without reading it: ``"N files, SIZE, HASH"``.

    HASH covers each file's name, size and version (:data:`_VERSION_FIELDS`), taken from one
    listing per folder, so a 4.5 GB checkpoint or 1,024 shards cost a few LIST calls, not a read
    of every byte (a sha256 of ImageNet's 140 GB would take longer than many stages). A file
    replaced at the same URL by an upload of other bytes gets another entity tag (object stores)
    or modification time (local files). A file that does not exist counts as ``missing``.
    """
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(url.rstrip("/").rsplit("/", 1)[0], []).append(url)
    rows, total = [], 0
    for folder, members in sorted(by_folder.items()):
        entries = retry(lambda: _entries(folder), f"listing {folder}")
        for url in sorted(members):
            entry = entries.get(posixpath.basename(url.rstrip("/")))
            if entry is None:
                rows.append(f"{url} missing")
                continue
            version = next((str(entry[k]) for k in _VERSION_FIELDS if entry.get(k) not in (None, "")), "")
            total += int(entry.get("size") or 0)
            rows.append(f"{url} {entry.get('size')} {version}")
    digest = sha256("\n".join(rows).encode())[:16]
    return f"{len(urls)} file{'s' if len(urls) != 1 else ''}, {_size(total)}, {digest}"


def _entries(folder: str) -> dict[str, dict[str, Any]]:
    """name -> fsspec's details of each object directly under ``folder`` (one listing; none if it is missing)."""
    fs, path = filesystem(folder)
    try:
        return {posixpath.basename(e["name"].rstrip("/")): e for e in fs.ls(path, detail=True, refresh=True)}
    except FileNotFoundError:
        return {}


def _size(n: float) -> str:
    """``3.1 MB``: decimal units, as object stores bill them."""
    units = ("B", "KB", "MB", "GB", "TB")
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    return url_to_fs(url)


def scheme(url: str) -> str:
    """``s3``, ``file``, ... (``file`` for a plain path)."""
    return url.split("://", 1)[0] if "://" in url else "file"


def join(base: str, *parts: str) -> str:
    """Join URL or path components with ``/`` (object stores have no ``os.sep``)."""
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return retry(lambda: fs.exists(path), f"looking up {url}")


def listdir(url: str) -> list[str]:
    """Names (not full paths) directly under ``url``; empty when it does not exist."""
    fs, path = filesystem(url)

    def names() -> list[str]:
        if not fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False, refresh=True))

    return retry(names, f"listing {url}")


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    retry(lambda: fs.makedirs(path, exist_ok=True), f"creating {url}")


def open_file(url: str, mode: str = "rb") -> IO[Any]:
    """Open for reading (or plain writing, where atomicity does not matter)."""
    return fsspec.open(url, mode).open()


@contextmanager
def atomic_write(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``url`` so that readers see the old object or the whole new one, never a torn one.

    Local files are written beside the target and renamed; object stores make a PUT visible only
    when it completes, so they are written in place.
    """
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if scheme(url) == "file":
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, mode) as f:
                yield f
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        with fs.open(path, mode) as f:
            yield f


def read_bytes(url: str) -> bytes:
    def read() -> bytes:
        with open_file(url, "rb") as f:
            return f.read()

    return retry(read, f"reading {url}")


def write_bytes(url: str, data: bytes) -> None:
    """Write the whole object (retried as a whole), recording its sha256 (see :func:`recording`)."""

    def write() -> None:
        with atomic_write(url, "wb") as f:
            f.write(data)

    retry(write, f"writing {url}")
    record({url: sha256(data)})


def read_json(url: str) -> Any:
    """The parsed JSON at ``url``; a file that does not parse is named in the error (a ValueError)."""
    data = read_bytes(url)
    try:
        return json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptArtifact(f"{url}: not valid JSON ({e})") from None


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")


def remove(url: str, recursive: bool = True) -> None:
    fs, path = filesystem(url)

    def rm() -> None:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    retry(rm, f"removing {url}")


def files(url: str) -> list[str]:
    """Every file under ``url``, as paths relative to it (empty when it does not exist)."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    found = retry(lambda: fs.find(root) if fs.exists(root) else [], f"listing {url}")
    return sorted(posixpath.relpath(path, root) for path in found)


def copy_tree(src: str, dst: str) -> None:
    """Copy every file under ``src`` to the same relative path under ``dst`` (across filesystems too)."""
    fs, root = filesystem(src)
    root = root.rstrip("/")
    for path in retry(lambda: fs.find(root), f"listing {src}"):
        write_bytes(join(dst, posixpath.relpath(path, root)), retry(lambda: fs.cat_file(path), f"reading {path}"))
