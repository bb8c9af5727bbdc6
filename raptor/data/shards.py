"""Write WebDataset tar shards to any fsspec URL, and read back their ``_info.json``.

RunFolder of one dataset folder (a local folder or ``s3://bucket/prefix``)::

    _plan.json              written first: what this folder is being filled with
    train-000000.tar ...    ``{prefix}-{index:06d}.tar``, each written atomically
    classes.json            class names; index = label
    _info.json              written last: shards, samples per shard, classes, total

A folder without ``_info.json`` is incomplete. Shard boundaries are planned up front from the
source, so shards are written in parallel, and a re-run with the same plan skips the shards that
already exist (every shard appears whole or not at all); a different plan in the same folder is an
error rather than a silent mix of two datasets.
"""

from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import webdataset as wds
from PIL import Image

from raptor import storage
from raptor.data.errors import DatasetError
from raptor.data.sources import IMAGE_EXTS, FileSource, Source, digest
from raptor.errors import CorruptArtifact, MissingInput, UserError

log = logging.getLogger(__name__)

INFO = "_info.json"
PLAN = "_plan.json"
CLASSES = "classes.json"
FORMAT = "raptor-shards/1"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def plan_shards(source: Source, max_samples: int, max_bytes: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` index ranges, one per shard, within both limits.

    A sample larger than ``max_bytes`` gets a shard of its own. Sources that cannot tell sizes
    cheaply are split by count alone.
    """
    ranges = []
    start, size = 0, 0
    for i in range(len(source)):
        nbytes = source.nbytes(i) or 0
        if i > start and (i - start >= max_samples or size + nbytes > max_bytes):
            ranges.append((start, i))
            start, size = i, 0
        size += nbytes
    ranges.append((start, len(source)))
    return ranges


def _reencode(sample: dict[str, Any], quality: int, where: str) -> dict[str, Any]:
    """Replace the image entry by a JPEG of the given quality (RGB); ``where`` names the input in errors."""
    out = {k: v for k, v in sample.items() if k not in IMAGE_EXTS}
    images = [v for k, v in sample.items() if k in IMAGE_EXTS]
    if len(images) != 1:
        raise UserError(f"{where}: not an image file ({', '.join(IMAGE_EXTS)}); nothing to re-encode")
    buf = io.BytesIO()
    try:
        Image.open(io.BytesIO(images[0])).convert("RGB").save(buf, "JPEG", quality=quality)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bytes it cannot decode; only PIL runs here
        raise UserError(f"{where}: cannot re-encode the image ({type(e).__name__}: {e})") from None
    out["jpg"] = buf.getvalue()
    return out


def _write_one(
    source: Source, start: int, stop: int, url: str, reencode: int | None
) -> int:
    """Build one shard in memory and PUT it in one piece, so a failure never leaves a torn shard."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as tar:
        for i in range(start, stop):
            sample = source.sample(i)
            if reencode is not None:
                where = source.urls[i] if isinstance(source, FileSource) else f"sample {sample.get('__key__')}"
                sample = _reencode(sample, reencode, where)
            tar.write({k: _as_bytes(k, v) for k, v in sample.items()})
    storage.write_bytes(url, buf.getvalue())
    return buf.tell()


def _as_bytes(key: str, value: bytes | str) -> bytes | str:
    return value.encode() if isinstance(value, str) and key != "__key__" else value


def listing(url: str) -> dict[str, int]:
    """Object name -> size directly under ``url`` (one listing call)."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        return {}
    entries = fs.ls(path, detail=True)
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries}


class _SequenceSource:
    """A list of ready sample dicts (``__key__``, image bytes, ``cls``) as a :class:`Source`."""

    def __init__(self, samples: Sequence[dict[str, Any]], classes: list[str]):
        self.samples, self.classes = samples, classes
        self.dense = bool(samples) and "seg.png" in samples[0]

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, index: int) -> dict[str, Any]:
        return self.samples[index]

    def nbytes(self, index: int) -> int | None:
        return sum(len(v) for k, v in self.samples[index].items() if isinstance(v, bytes))

    def fingerprint(self) -> str:
        return digest([self.classes, [s["__key__"] for s in self.samples]])


def _prepare_folder(out_url: str, plan: dict[str, Any], overwrite: bool) -> dict[str, int]:
    """Claim ``out_url`` for ``plan``; returns what is already there (name -> size).

    An empty folder gets the plan; a folder with the same plan is a re-run; anything else is an
    error unless ``overwrite`` clears the older dataset (its shards, plan, classes and info).
    """
    existing = listing(out_url)
    if overwrite:
        for name in existing:
            ours = name.startswith(f"{plan['prefix']}-") and name.endswith(".tar")
            if ours or name in (PLAN, INFO, CLASSES):
                storage.remove(storage.join(out_url, name))
        existing = listing(out_url)
    if PLAN in existing:
        old = storage.read_json(storage.join(out_url, PLAN))
        if not isinstance(old, dict):
            raise DatasetError(f"{storage.join(out_url, PLAN)}: expected a JSON object, got {type(old).__name__}")
        if old.get("id") != plan["id"]:
            raise UserError(
                f"{out_url} already holds another dataset (prefix {old.get('prefix')!r}, plan "
                f"{old.get('id')}); write to an empty folder or pass overwrite=True (--overwrite)"
            )
    elif existing:
        raise UserError(f"{out_url} is not empty and holds no {PLAN}; write to an empty folder")
    else:
        storage.write_json(storage.join(out_url, PLAN), plan)
    return existing


def write_shards(
    samples_or_source: Source | Sequence[dict[str, Any]],
    out_url: str,
    *,
    prefix: str = "train",
    max_samples: int = 1000,
    max_bytes: int = 256 * 2**20,
    workers: int = 4,
    reencode: int | None = None,
    classes: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a dataset as ``{prefix}-NNNNNN.tar`` shards under ``out_url``; returns the info dict.

    ``samples_or_source`` is a :class:`~raptor.data.sources.Source` (``imagefolder_source``,
    ``listfile_source``, ``synthetic_source``) or a list of sample dicts (then pass ``classes``).
    Image bytes are stored as they are unless ``reencode`` gives a JPEG quality. ``workers``
    shards are built and uploaded at once (threads: the work is encoding and I/O). A re-run with
    the same source and limits skips finished shards; ``overwrite`` clears an older dataset first.
    Each shard is built in memory and stored in one piece, so ``workers * max_bytes`` bounds the
    memory it takes.
    """
    if max_samples < 1 or max_bytes < 1 or workers < 1:
        raise UserError("max_samples, max_bytes and workers must be positive")
    if not prefix or "/" in prefix:
        raise UserError(f"prefix must be a plain name without '/', got {prefix!r}")
    if hasattr(samples_or_source, "sample"):
        source: Source = samples_or_source  # type: ignore[assignment]
    else:
        if classes is None:
            raise UserError("writing a list of samples needs classes=[...]")
        source = _SequenceSource(samples_or_source, classes)  # type: ignore[arg-type]
    if len(source) == 0:
        raise UserError("the source has no samples")
    ranges = plan_shards(source, max_samples, max_bytes)
    plan = {
        "format": FORMAT,
        "prefix": prefix,
        "source": source.fingerprint(),
        "ranges": digest(ranges),
        "reencode": reencode,
    }
    plan["id"] = digest(plan)
    existing = _prepare_folder(out_url, plan, overwrite)
    names = [shard_name(prefix, i) for i in range(len(ranges))]
    todo = [i for i, name in enumerate(names) if name not in existing]
    if todo and INFO in existing:
        storage.remove(storage.join(out_url, INFO))  # incomplete again until the end
    log.info(
        "writing %d of %d shards (%d samples) to %s", len(todo), len(names), len(source), out_url
    )
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        futures = {
            i: pool.submit(
                _write_one, source, *ranges[i], storage.join(out_url, names[i]), reencode
            )
            for i in todo
        }
        written = {i: f.result() for i, f in futures.items()}
    sizes = [written[i] if i in written else existing[names[i]] for i in range(len(ranges))]
    info = {
        "format": FORMAT,
        "prefix": prefix,
        "plan": plan["id"],
        "shards": [
            {"name": name, "samples": stop - start, "bytes": int(size)}
            for name, (start, stop), size in zip(names, ranges, sizes)
        ],
        "total": len(source),
        "classes": list(source.classes),
        "num_classes": len(source.classes),
        "dense": bool(getattr(source, "dense", False)),
    }
    storage.write_json(storage.join(out_url, CLASSES), info["classes"])
    storage.write_json(storage.join(out_url, INFO), info)
    log.info(
        "wrote %d shards in %.1fs (%d skipped as already complete)",
        len(todo), time.perf_counter() - t0, len(names) - len(todo),
    )
    return info


def read_info(url: str) -> dict[str, Any]:
    """The ``_info.json`` of a raptor dataset folder (or of the folder a shard pattern points into).

    Raises :class:`~raptor.errors.MissingInput` naming the folder when the dataset is missing or incomplete,
    :class:`DatasetError` when its info file is damaged or another layout's (see
    :mod:`raptor.data.formats` for reading timm's and info-less shard sets).
    """
    folder = dataset_folder(url)
    info = read_info_file(folder)
    if info is None:
        raise MissingInput(
            f"{folder}: no {INFO} (not a shard folder, or the writer has not finished)"
        )
    if info.get("format") != FORMAT:
        raise DatasetError(
            f"{storage.join(folder, INFO)}: unknown format {info.get('format')!r}, expected {FORMAT}"
        )
    return info


def read_info_file(folder: str) -> dict[str, Any] | None:
    """``folder/_info.json`` as a dict, None when there is none; a damaged one is a one-line
    :class:`DatasetError` naming the file."""
    path = storage.join(folder, INFO)
    try:
        info = storage.read_json(path)
    except FileNotFoundError:
        return None
    except CorruptArtifact as e:
        raise DatasetError(str(e)) from None
    if not isinstance(info, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info



def dataset_folder(url: str) -> str:
    """``s3://b/ds`` for itself, for ``s3://b/ds/train-{000000..000009}.tar`` or one shard."""
    last = url.rstrip("/").rsplit("/", 1)
    if len(last) == 2 and (last[1].endswith(".tar") or "{" in last[1]):
        return last[0]
    return url.rstrip("/")
