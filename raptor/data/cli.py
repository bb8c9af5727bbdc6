"""``raptor shards ...`` (write shards, ``info``: what the loader finds) and ``raptor data bench``."""

from __future__ import annotations

import argparse
import json

from pydantic import ValidationError

from raptor.data.bench import bench
from raptor.data.errors import DatasetError
from raptor.data.formats import Shards, check_present, describe
from raptor.data.reader import ErrorBudgetExceeded
from raptor.data.settings import LoaderSettings
from raptor.data.shards import write_shards
from raptor.data.sources import FileSource, imagefolder_source, listfile_source
from raptor.data.synthetic import synthetic_source
from raptor.errors import UserError

_DEFAULTS = LoaderSettings.model_fields  # the flags that are loader settings default to the settings' defaults


def register(subparsers: argparse._SubParsersAction) -> None:
    shards = subparsers.add_parser("shards", help="write WebDataset shards (folder or s3:// URL)")
    sub = shards.add_subparsers(dest="shards_command", required=True, metavar="SOURCE")

    p = sub.add_parser("imagefolder", help="convert an ImageNet-layout SRC/<class>/<image> tree")
    p.add_argument("src")
    _writer_args(p)
    p.set_defaults(func=lambda a: _write(a, imagefolder_source(a.src)))

    p = sub.add_parser("list", help="convert a list file of 'path<TAB>label' lines")
    p.add_argument("listfile")
    _writer_args(p)
    p.set_defaults(func=lambda a: _write(a, _listfile(a.listfile)))

    p = sub.add_parser("generate", help="write the procedural labelled image set")
    _writer_args(p)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=112, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", action="store_true", help="add seg.png masks and depth.npy maps")
    p.set_defaults(
        func=lambda a: _write(a, synthetic_source(a.samples, a.classes, a.size, a.seed, a.dense))
    )

    p = sub.add_parser("info", help="what the loader finds at URL: layout, splits, shards, samples, labels")
    p.add_argument("url", help="dataset folder (raptor, timm or plain .tar files) or shard pattern")
    _dataset_args(p)
    p.add_argument("--samples", type=int, help="state the sample count of a set with no info file")
    p.add_argument("--count", action="store_true",
                   help="count the samples of a set with no info file (tar headers; cached beside them)")
    p.add_argument("--json", action="store_true", help="print the findings as one JSON object")
    p.set_defaults(func=_info)

    data = subparsers.add_parser("data", help="data tools")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    p = dsub.add_parser("bench", help="decode+augment samples/s per loader worker")
    p.add_argument("url", help="dataset folder or shard pattern")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=_DEFAULTS["batch_size"].default)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=1, help="loader worker processes")
    p.add_argument("--eval", action="store_true", help="eval transform instead of train")
    p.add_argument("--decode", choices=("cpu", "gpu"), default=_DEFAULTS["decode"].default,
                   help="gpu: workers pass JPEG bytes, this process decodes them on --device")
    p.add_argument("--device", help="where batches are delivered (default: cpu; cuda for --decode gpu)")
    p.add_argument("--normalize", action="store_true",
                   help="time the float normalisation too (else left to the training device)")
    p.add_argument("--bare", action="store_true",
                   help="also time a bare decode_jpeg + RandomResizedCrop + flip loop; print the ratio")
    _dataset_args(p)
    p.set_defaults(func=_bench)


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", help="split of a timm dataset, or set of .tar files in a folder")
    p.add_argument("--label-key", default=_DEFAULTS["label_key"].default,
                   help="member holding the class index (cls), or MEMBER:FIELD of a JSON member (json:label)")


def _writer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder or s3://bucket/prefix")
    p.add_argument("--prefix", default="train", help="shard name prefix (train, val, ...)")
    p.add_argument("--max-samples", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--max-mb", type=float, default=256, help="MiB per shard at most")
    p.add_argument("--workers", type=int, default=4, help="shards written at once")
    p.add_argument("--reencode", type=int, metavar="QUALITY", help="re-encode images as JPEG")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in OUT")


def _listfile(path: str) -> FileSource:
    """The list file's source; bytes that are not text are named here, not left as a UnicodeDecodeError."""
    try:
        return listfile_source(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file of 'path<TAB>label' lines ({e.reason} at byte {e.start})") from None


def _write(args: argparse.Namespace, source) -> int:
    info = write_shards(
        source,
        args.out,
        prefix=args.prefix,
        max_samples=args.max_samples,
        max_bytes=int(args.max_mb * 2**20),
        workers=args.workers,
        reencode=args.reencode,
        overwrite=args.overwrite,
    )
    print(_summary(args.out, info))
    return 0


def _summary(url: str, info: dict) -> str:
    size = sum(s["bytes"] for s in info["shards"]) / 2**20
    return (
        f"{url}: {info['total']} samples, {info['num_classes']} classes, "
        f"{len(info['shards'])} shards, {size:.1f} MiB" + (", dense" if info["dense"] else "")
    )


def _info(args: argparse.Namespace) -> int:
    found = describe(args.url, split=args.split, label_key=args.label_key, samples=args.samples,
                     count=args.count)
    print(json.dumps(found) if args.json else _described(found))
    return 0


def _described(d: dict) -> str:
    splits = ", ".join(f"{name} {n if n is not None else '?'}" for name, n in d["splits"].items())
    samples = "unknown (--count counts them once, or --samples states them)"
    if d["samples"] is not None:
        samples = f"{d['samples']} (from {d['count_source']})"
    lines = [
        f"{d['url']}: {d['layout']} layout in {d['folder']}" + (", dense" if d["dense"] else ""),
        f"  splits:  {splits}" + (f"; reading {d['split']}" if d["split"] else ""),
        f"  shards:  {d['shards']} ({d['first_shard']} .. {d['last_shard']})",
        f"  samples: {samples}",
        f"  classes: {d['num_classes'] if d['num_classes'] is not None else 'unknown (pass num_classes)'}",
    ]
    first = d["first_sample"]
    if d["first_shard_damage"]:
        lines.append(f"  first sample: unreadable, the first shard is damaged ({d['first_shard_damage']})")
    elif first is None:
        lines.append("  first sample: none (the first shard is empty)")
    else:
        lines.append(
            f"  first sample {first['key']}: members {', '.join(first['members'])}; "
            f"image {first['image'] or 'none'}; label ({d['label_key']}) {first['label']}"
        )
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    check_present(Shards.resolve(args.url, split=args.split))
    flags = {"batch_size": "--batch-size", "num_workers": "--workers", "decode": "--decode", "label_key": "--label-key"}
    try:
        settings = LoaderSettings(batch_size=args.batch_size, num_workers=args.workers, decode=args.decode,
                                  label_key=args.label_key)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{flags[str(err['loc'][0])]} {err['input']}: {err['msg']}") from None
    try:
        result = bench(
            args.url,
            settings,
            image_size=args.size,
            batches=args.batches,
            train=not args.eval,
            device=args.device,
            normalize=args.normalize,
            bare=args.bare,
            split=args.split,
        )
    except ErrorBudgetExceeded as e:  # the shards' content, not the loader: the user's to fix
        raise DatasetError(f"{args.url}: {e}") from None
    print(json.dumps(result))
    return 0
