"""Which shards make a dataset and how many samples they hold, for the layouts people already have.

- ``raptor``: a folder :func:`~raptor.data.write_shards` wrote; its ``_info.json`` (format
  ``raptor-shards/1``) lists shards, samples per shard and classes.
- ``timm``: timm's WebDataset layout, as published for ImageNet on the Hugging Face hub
  (``timm/imagenet-1k-wds``: ``imagenet1k-train-{0000..1023}.tar``, members ``.jpg``/``.cls``/
  ``.json``): its ``_info.json`` has ``splits``, a mapping (or list) of ``{name, num_samples,
  filenames, shard_lengths}``. A split is picked by name (the folder URL plus ``split``), or a
  shard pattern picks shards whose lengths are looked up by file name.
- ``plain``: tars with no info file. A brace pattern, or a folder whose ``.tar`` files are taken
  (by ``split`` when their names make several sets: ``train-0000.tar`` and ``val-0000.tar``). The
  sample count comes from ``samples=`` or is counted once from the tar headers (no image data is
  read) and cached in ``_raptor_counts.json`` beside the shards when that folder is writable;
  a cached count is re-used while the shard keeps its size.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import webdataset as wds

from raptor import storage
from raptor.data import tarstream
from raptor.data.decode import LabelKey, image_entry
from raptor.data.gopen import TRANSIENT, ShardUnavailableError, open_shard, wait_before_retry
from raptor.data.errors import DatasetError
from raptor.data.shards import FORMAT, INFO, dataset_folder, listing, read_info_file
from raptor.errors import MissingInput, UserError

log = logging.getLogger(__name__)

COUNTS = "_raptor_counts.json"
COUNTS_FORMAT = "raptor-counts/1"


@dataclass(frozen=True)
class Shards:
    """The shard URLs of one split, with what is known of their sample counts."""

    urls: list[str]
    counts: list[int | None]  # samples per shard, None where unknown
    total: int | None  # samples in all of them, None when unknown
    num_classes: int | None
    layout: str  # "raptor", "timm" or "plain"
    folder: str
    split: str | None = None
    count_source: str = "unknown"  # where ``total`` came from, for ``raptor shards info``
    splits: dict[str, int | None] = field(default_factory=dict)  # every split here -> samples
    dense: bool = False

    @classmethod
    def resolve(
        cls,
        url: str,
        *,
        split: str | None = None,
        samples: int | None = None,
        num_classes: int | None = None,
        count: bool = False,
    ) -> "Shards":
        """The shards at ``url`` (a dataset folder, a brace pattern or one shard).

        ``samples`` states the total (then nothing is counted); ``count`` counts the samples of
        an info-less shard set (once: see the module docstring) when the total is unknown;
        ``num_classes`` states the class count where no info file gives it.
        """
        if samples is not None and samples < 1:
            raise UserError(f"samples must be positive, got {samples}")
        folder = dataset_folder(url)
        pattern = None if folder == url.rstrip("/") else url
        info = read_info_file(folder)
        if info is None:
            shards = _plain(folder, pattern, split)
        elif info.get("format") == FORMAT:
            shards = _raptor(info, folder, pattern, split)
        elif "splits" in info:
            shards = _timm(info, folder, pattern, split)
        else:
            raise DatasetError(
                f"{storage.join(folder, INFO)}: neither raptor's (format {FORMAT}) nor timm's "
                "(splits) dataset info"
            )
        if not shards.urls:
            raise DatasetError(f"{url}: the dataset lists no shards")
        if samples is not None:
            if shards.total is not None and shards.total != samples:
                log.warning("%s: using samples=%d, not the %d its %s gives",
                            url, samples, shards.total, shards.count_source)
            shards = replace(shards, total=samples, count_source="samples argument")
        elif shards.total is None and count:
            check_present(shards)
            counts = count_shards(shards.urls)
            shards = replace(shards, counts=counts, total=sum(counts),
                           count_source=f"counted from the tar headers ({COUNTS})")
        if num_classes is not None:
            shards = replace(shards, num_classes=num_classes)
        return shards


def _expand(pattern: str) -> list[str]:
    try:
        return list(wds.shardlists.expand_urls(pattern))
    except ValueError as e:
        raise UserError(f"{pattern}: not a shard pattern ({e})") from None


def _raptor(info: dict[str, Any], folder: str, pattern: str | None, split: str | None) -> Shards:
    path = storage.join(folder, INFO)
    prefix, shards, num_classes = info.get("prefix"), info.get("shards"), info.get("num_classes")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and _count_ok(s.get("samples"))
        for s in shards
    ):
        raise DatasetError(f"{path}: 'shards' must be a list of {{name, samples}}")
    if not isinstance(prefix, str) or not (num_classes is None or _count_ok(num_classes)):
        raise DatasetError(f"{path}: needs a 'prefix' name and an integer 'num_classes'")
    if not (info.get("total") is None or _count_ok(info["total"])):
        raise DatasetError(f"{path}: 'total' must be the number of samples, got {info['total']!r}")
    if split is not None and split != prefix:
        raise DatasetError(
            f"{folder}: a raptor shard folder holds one split, {prefix!r}; got split {split!r}"
        )
    listed = {s["name"]: s["samples"] for s in shards}
    names = [_name(u) for u in _expand(pattern)] if pattern else list(listed)
    counts = [listed.get(n) for n in names]
    known = None not in counts
    return Shards(
        urls=[storage.join(folder, n) for n in names],
        counts=counts,
        total=sum(c for c in counts if c is not None) if known else None,
        num_classes=num_classes,
        layout="raptor",
        folder=folder,
        split=prefix,
        count_source=INFO if known else "unknown",
        splits={prefix: info.get("total")},
        dense=bool(info.get("dense")),
    )


def _timm(info: dict[str, Any], folder: str, pattern: str | None, split: str | None) -> Shards:
    path = storage.join(folder, INFO)
    splits = _timm_splits(info, path)
    summary = {name: s["num_samples"] for name, s in splits.items()}
    num_classes = info.get("num_classes")
    if not (num_classes is None or _count_ok(num_classes)):
        raise DatasetError(f"{path}: 'num_classes' must be an integer, got {num_classes!r}")
    if pattern:
        lengths = {f: n for s in splits.values() for f, n in zip(s["filenames"], s["shard_lengths"])}
        names = [_name(u) for u in _expand(pattern)]
        counts = [lengths.get(n) for n in names]
        known = None not in counts
        return Shards(
            urls=[storage.join(folder, n) for n in names], counts=counts,
            total=sum(c for c in counts if c is not None) if known else None,
            num_classes=num_classes, layout="timm", folder=folder, split=split,
            count_source=f"{INFO} shard_lengths" if known else "unknown", splits=summary,
        )
    if split is None:
        if len(splits) != 1:
            raise DatasetError(f"{folder}: pick a split of {sorted(splits)} (split=...)")
        split = next(iter(splits))
    if split not in splits:
        raise DatasetError(f"{folder}: no split {split!r} in {INFO}; it has {sorted(splits)}")
    chosen = splits[split]
    counts = list(chosen["shard_lengths"]) or [None] * len(chosen["filenames"])
    return Shards(
        urls=[storage.join(folder, f) for f in chosen["filenames"]], counts=counts,
        total=chosen["num_samples"], num_classes=num_classes, layout="timm", folder=folder,
        split=split, count_source=f"{INFO} num_samples", splits=summary,
    )


def _timm_splits(info: dict[str, Any], path: str) -> dict[str, dict[str, Any]]:
    """``splits`` (a name -> entry mapping, or a list of entries with ``name``), checked."""
    raw = info["splits"]
    entries = list(raw.values()) if isinstance(raw, dict) else raw
    names = list(raw) if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path}: 'splits' must be a non-empty mapping or list of splits")
    out: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: splits[{names[i] if names else i}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object")
        name = entry.get("name", names[i] if names else None)
        files, lengths = entry.get("filenames"), entry.get("shard_lengths", [])
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{where}: needs a 'name'")
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise DatasetError(f"{where}: 'filenames' must be a non-empty list of shard names")
        if not isinstance(lengths, list) or not all(_count_ok(n) for n in lengths) or (
            lengths and len(lengths) != len(files)
        ):
            raise DatasetError(f"{where}: 'shard_lengths' must hold one sample count per file")
        num = entry.get("num_samples", sum(lengths) if lengths else None)
        if not _count_ok(num) or not num:
            raise DatasetError(f"{where}: 'num_samples' must be a positive integer")
        out[name] = {"num_samples": num, "filenames": files, "shard_lengths": lengths}
    return out


def _count_ok(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


_SET = re.compile(r"^(.*?)[-_.]?\d+$")


def shard_set(name: str) -> str:
    """The set a shard name belongs to: the name without ``.tar`` and its trailing number
    (``imagenet1k-train-0007.tar`` -> ``imagenet1k-train``)."""
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    match = _SET.match(stem)
    return match.group(1) if match and match.group(1) else stem


def _split_matches(set_name: str, split: str) -> bool:
    return set_name == split or re.search(rf"(^|[-_.]){re.escape(split)}$", set_name) is not None


def _plain(folder: str, pattern: str | None, split: str | None) -> Shards:
    if pattern:
        urls = _expand(pattern)
        sets = sorted({shard_set(_name(u)) for u in urls})
    else:
        names = sorted(n for n in listing(folder) if n.endswith(".tar"))
        if not names:
            raise MissingInput(f"{folder}: no {INFO} and no .tar shards")
        sets = sorted({shard_set(n) for n in names})
        if split is not None:
            picked = [s for s in sets if _split_matches(s, split)]
            if len(picked) != 1:
                raise DatasetError(
                    f"{folder}: split {split!r} matches {len(picked)} of the shard sets {sets}"
                )
            names = [n for n in names if shard_set(n) == picked[0]]
            sets = picked
        elif len(sets) > 1:
            raise DatasetError(f"{folder}: its .tar files make several sets {sets}; pick one (split=...)")
        urls = [storage.join(folder, n) for n in names]
    counts = cached_counts(folder, [_name(u) for u in urls])
    known = None not in counts
    return Shards(
        urls=urls, counts=counts,
        total=sum(c for c in counts if c is not None) if known else None,
        num_classes=None, layout="plain", folder=folder, split=split,
        count_source=COUNTS if known else "unknown", splits={s: None for s in sets},
    )


def check_present(shards: Shards) -> None:
    """:class:`MissingInput` naming the first listed shard that is not there (one listing per folder):
    opening it would be retried for seconds, then reported as if the store were unreachable."""
    by_folder: dict[str, dict[str, int]] = {}
    for url in shards.urls:
        folder = dataset_folder(url)
        if folder not in by_folder:
            by_folder[folder] = listing(folder)
        if _name(url) not in by_folder[folder]:
            raise MissingInput(f"{url}: no such shard (the dataset at {shards.folder} lists it)")


def cached_counts(folder: str, names: list[str]) -> list[int | None]:
    """Per shard, its count from ``_raptor_counts.json`` if the shard still has the size it had."""
    path = storage.join(folder, COUNTS)
    try:
        cache = storage.read_json(path)
    except FileNotFoundError:
        return [None] * len(names)
    except ValueError:
        cache = None
    ours = isinstance(cache, dict) and cache.get("format") == COUNTS_FORMAT
    entries = cache.get("shards") if ours else None
    if not isinstance(entries, dict):
        log.warning("%s: unreadable, counting again", path)
        return [None] * len(names)
    sizes = listing(folder)
    out: list[int | None] = []
    for name in names:
        entry = entries.get(name)
        fresh = (isinstance(entry, dict) and _count_ok(entry.get("samples"))
                 and entry.get("bytes") == sizes.get(name))
        out.append(entry["samples"] if fresh else None)
    return out


def count_shards(urls: list[str], *, workers: int = 8, retries: int = 3, backoff_s: float = 1.0) -> list[int]:
    """Samples per shard, counted from the tar headers (a few shards at once), then cached beside
    them when the folder is writable. A damaged shard counts the samples before the damage."""
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(dataset_folder(url), []).append(_name(url))
    known: dict[str, int] = {}
    for folder, names in by_folder.items():
        for name, n in zip(names, cached_counts(folder, names)):
            if n is not None:
                known[storage.join(folder, name)] = n
    todo = [u for u in urls if u not in known]
    if todo:
        log.info("counting the samples of %d shards from their tar headers (once)", len(todo))
        with ThreadPoolExecutor(min(workers, len(todo))) as pool:
            counted = pool.map(lambda u: _count_one(u, retries, backoff_s), todo)
            known.update(zip(todo, counted))
        for folder, names in by_folder.items():
            _save_counts(folder, {n: known[storage.join(folder, n)] for n in names})
    return [known[u] for u in urls]


def _count_one(url: str, retries: int, backoff_s: float) -> int:
    """One shard's count; a read that breaks off is tried again, as the reader does."""
    attempt = 0
    while True:
        try:
            with open_shard(url, retries=retries, backoff_s=backoff_s) as stream:
                count, damage = tarstream.count_samples(stream)
            break
        except TRANSIENT as e:
            if attempt == retries:
                raise ShardUnavailableError(
                    f"shard {url} could not be counted: {type(e).__name__}: {e}"
                ) from e
            wait_before_retry(f"counting shard {url}", e, attempt, backoff_s)
            attempt += 1
    if damage is not None:
        log.warning("%s: %s; counted the %d samples before the damage", url, damage, count)
    return count


def _save_counts(folder: str, counts: dict[str, int]) -> None:
    path = storage.join(folder, COUNTS)
    sizes = listing(folder)
    try:
        old = storage.read_json(path)["shards"]
        old = old if isinstance(old, dict) else {}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        old = {}
    entries = {**old, **{n: {"samples": c, "bytes": sizes.get(n)} for n, c in counts.items()}}
    try:
        storage.write_json(path, {"format": COUNTS_FORMAT, "shards": entries})
    except OSError as e:  # a read-only bucket or folder: count again next time
        log.info("could not cache the sample counts in %s (%s)", path, e)


def describe(
    url: str,
    *,
    split: str | None = None,
    label_key: str = "cls",
    samples: int | None = None,
    num_classes: int | None = None,
    count: bool = False,
) -> dict[str, Any]:
    """What the loader would read at ``url``: layout, splits, shards, samples (and where that
    count comes from), classes, and the members and label of the first sample."""
    key = LabelKey.parse(label_key)
    shards = Shards.resolve(url, split=split, samples=samples, num_classes=num_classes, count=count)
    check_present(shards)
    first, damage = None, None
    with open_shard(shards.urls[0]) as stream:
        try:
            first = next((s for s, _ in tarstream.samples(stream, shards.urls[0])), None)
        except tarstream.CorruptShard as e:
            damage = str(e)
    out: dict[str, Any] = {
        "url": url,
        "layout": shards.layout,
        "folder": shards.folder,
        "splits": shards.splits,
        "split": shards.split,
        "shards": len(shards.urls),
        "first_shard": _name(shards.urls[0]),
        "last_shard": _name(shards.urls[-1]),
        "samples": shards.total,
        "count_source": shards.count_source,
        "num_classes": shards.num_classes,
        "dense": shards.dense,
        "label_key": str(key),
        "first_sample": None,
        "first_shard_damage": damage,
    }
    if first is not None:
        try:
            image: str | None = image_entry(first)
        except ValueError:
            image = None
        try:
            label: int | str = key.read(first, shards.num_classes)
        except ValueError as e:
            label = f"unreadable: {e}"
        members = sorted(k for k in first if not k.startswith("__"))
        out["first_sample"] = {"key": first["__key__"], "members": members, "image": image, "label": label}
    return out
