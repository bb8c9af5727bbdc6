"""One small helper for object storage: every artifact, shard, checkpoint and report goes through it.

Paths are plain local paths or any fsspec URL (``s3://bucket/key``, ``file://``, ``memory://``).
S3 endpoint and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), which s3fs/botocore read themselves, so a MinIO, Ceph or moto server
works by setting ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import IO, Any, Iterator

import fsspec
from fsspec.core import url_to_fs


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
    return fs.exists(path)


def listdir(url: str) -> list[str]:
    """Names (not full paths) directly under ``url``; empty when it does not exist."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


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
    with open_file(url, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    with atomic_write(url, "wb") as f:
        f.write(data)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url).decode())


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")


def remove(url: str, recursive: bool = True) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def copy_tree(src: str, dst: str) -> None:
    """Copy every file under ``src`` to the same relative path under ``dst`` (across filesystems too)."""
    fs, root = filesystem(src)
    root = root.rstrip("/")
    for path in fs.find(root):
        write_bytes(join(dst, posixpath.relpath(path, root)), fs.cat_file(path))
