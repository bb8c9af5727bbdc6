"""Where shard samples come from: an ImageFolder tree, a list file, or any object with this shape.

A source is an indexable collection, so the writer can plan shard boundaries up front, write shards
in parallel and skip finished ones on a re-run. ``sample(i)`` returns one WebDataset sample: a dict
with ``__key__``, the image bytes under their extension (``jpg``, ``png``, ...), ``cls`` (the class
index as text) and, for dense samples, ``seg.png`` and ``depth.npy``.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

from raptor import storage
from raptor.errors import MissingInput, UserError

# Sample entries that hold the image (``seg.png`` is a mask, not an image entry).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


class Source(Protocol):
    """What :func:`raptor.data.write_shards` needs from a dataset."""

    classes: list[str]

    def __len__(self) -> int: ...

    def sample(self, index: int) -> dict[str, bytes | str]: ...

    def nbytes(self, index: int) -> int | None:
        """Encoded size of sample ``index`` if known cheaply (for ``max_bytes``), else None."""
        ...

    def fingerprint(self) -> str:
        """Changes whenever the samples would; guards re-runs against mixing two datasets."""
        ...


def sample_key(index: int, name: str) -> str:
    """A WebDataset key: unique by index, readable by name; no dots (they start the extension)."""
    stem = posixpath.splitext(posixpath.basename(name))[0]
    return f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', stem)}"


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FileSource:
    """Image files with labels; the image bytes are copied into the shards unchanged."""

    urls: list[str]
    labels: list[int]
    sizes: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.urls)

    def sample(self, index: int) -> dict[str, bytes | str]:
        url = self.urls[index]
        ext = posixpath.splitext(url)[1].lower().lstrip(".")
        return {
            "__key__": sample_key(index, url),
            "jpg" if ext == "jpeg" else ext: storage.read_bytes(url),
            "cls": str(self.labels[index]),
        }

    def nbytes(self, index: int) -> int | None:
        return self.sizes[index]

    def fingerprint(self) -> str:
        return digest([self.classes, self.urls, self.labels, self.sizes])


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower().lstrip(".") in IMAGE_EXTS


def _url(fs_protocol: str | tuple, path: str, like: str) -> str:
    """Turn an fsspec path back into the URL form the caller used (plain path stays plain)."""
    if "://" not in like:
        return path
    proto = fs_protocol if isinstance(fs_protocol, str) else fs_protocol[0]
    return f"{proto}://{path}"


def imagefolder_source(root: str) -> FileSource:
    """``root/<class>/**/<image>``, the ImageNet layout; class index = rank of the sorted name."""
    fs, path = storage.filesystem(root)
    if not fs.isdir(path):
        raise MissingInput(f"{root}: no such folder")
    class_dirs = sorted(
        e["name"].rstrip("/") for e in fs.ls(path, detail=True) if e["type"] == "directory"
    )
    urls: list[str] = []
    labels: list[int] = []
    sizes: list[int] = []
    classes = [posixpath.basename(d) for d in class_dirs]
    for label, class_dir in enumerate(class_dirs):
        files = fs.find(class_dir, detail=True)
        for name in sorted(files):
            if _is_image(name):
                urls.append(_url(fs.protocol, name, root))
                labels.append(label)
                sizes.append(int(files[name]["size"]))
    if not urls:
        raise UserError(f"{root}: no images found (expected {root}/<class>/<image>.jpg)")
    return FileSource(urls, labels, sizes, classes)


def listfile_source(path: str) -> FileSource:
    """A text file of ``path<TAB>label`` lines; relative paths are relative to the list file.

    Integer labels are class indices; otherwise the sorted distinct label names are the classes.
    """
    base = posixpath.dirname(path) if "://" in path else os.path.dirname(os.path.abspath(path))
    rows: list[tuple[str, str]] = []
    for lineno, line in enumerate(storage.read_bytes(path).decode().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1].strip():
            raise UserError(f"{path}:{lineno}: expected 'path<TAB>label', got {line!r}")
        file, label = parts[0], parts[1].strip()
        absolute = "://" in file or file.startswith("/")
        rows.append((file if absolute else storage.join(base, file), label))
    if not rows:
        raise UserError(f"{path}: the list is empty")
    names = [label for _, label in rows]
    if all(re.fullmatch(r"\d+", n) for n in names):
        labels = [int(n) for n in names]
        classes = [str(i) for i in range(max(labels) + 1)]
    else:
        classes = sorted(set(names))
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[n] for n in names]
    urls = [file for file, _ in rows]
    return FileSource(urls, labels, _sizes(urls), classes)


def _sizes(urls: Sequence[str]) -> list[int]:
    """File sizes with one listing per folder rather than one request per file."""
    by_dir: dict[str, dict[str, int]] = {}
    sizes = []
    for url in urls:
        fs, path = storage.filesystem(url)
        parent = posixpath.dirname(path)
        if parent not in by_dir:
            listing = fs.ls(parent, detail=True) if fs.isdir(parent) else []
            by_dir[parent] = {e["name"]: int(e["size"] or 0) for e in listing}
        size = by_dir[parent].get(path)
        if size is None:
            raise MissingInput(f"{url}: listed image does not exist")
        sizes.append(size)
    return sizes
