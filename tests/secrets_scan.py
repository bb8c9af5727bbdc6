"""Search files, stored objects and captured output for planted credentials.

A scan that finds nothing proves nothing unless it is known to have looked: :class:`Scan` keeps
the name of everything it searched (so a test can require a floor and the files a run must write)
and every hit (so a planted control secret can be required to be found).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Hit:
    """``value`` (one of the needles) occurs in the thing named ``where``."""

    where: str
    value: str


@dataclass
class Scan:
    """Every needle searched for, as bytes, in everything handed to it."""

    needles: Sequence[str]
    hits: list[Hit] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.needles = tuple(self.needles)
        if not self.needles or not all(self.needles):
            raise ValueError("a scan needs non-empty needles (an empty one is in everything)")

    def search(self, where: str, data: bytes | str) -> None:
        """One file, object or captured output."""
        blob = data.encode() if isinstance(data, str) else data
        self.searched.append(where)
        self.hits.extend(Hit(where, n) for n in self.needles if n.encode() in blob)

    def walk(self, root: str | Path) -> int:
        """Every regular file under ``root`` (symlinks skipped: what they point to is searched where it lies;
        files that vanish mid-walk, e.g. Ray's rotated logs, skipped); how many were searched."""
        before = len(self.searched)
        for path in sorted(Path(root).rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            self.search(str(path), data)
        return len(self.searched) - before

    def objects(self, items: Iterable[tuple[str, bytes]]) -> int:
        """``(name, bytes)`` pairs, e.g. the objects of a bucket; how many were searched."""
        before = len(self.searched)
        for where, data in items:
            self.search(where, data)
        return len(self.searched) - before


def scan(needles: Iterable[str], roots: Iterable[str | Path] = (),
         objects: Iterable[tuple[str, bytes]] = ()) -> tuple[list[Hit], int]:
    """Search every file under ``roots`` and every ``(name, bytes)`` in ``objects``: (hits, things searched)."""
    s = Scan(needles)
    for root in roots:
        s.walk(root)
    s.objects(objects)
    return s.hits, len(s.searched)
