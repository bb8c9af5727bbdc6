"""Public shard layouts read as they are: timm's ImageNet WebDataset, info-less tar sets, label keys."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from raptor import storage
from raptor.cli import main
from raptor.data import DatasetError, LoaderSettings, Shards, describe, loader, synthetic_source
from raptor.data.formats import COUNTS
from raptor.errors import UserError

SIZE = 32


def write_tar(path: str, samples: list[dict[str, bytes | str]]) -> None:
    """A shard as any WebDataset writer makes it: members ``{key}.{suffix}`` in sample order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for sample in samples:
            for suffix, data in sample.items():
                if suffix == "__key__":
                    continue
                data = data.encode() if isinstance(data, str) else data
                member = tarfile.TarInfo(f"{sample['__key__']}.{suffix}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    storage.write_bytes(path, buf.getvalue())


def timm_dataset(root: str, splits: dict[str, list[int]], *, as_list: bool = False) -> list[dict]:
    """timm's ImageNet layout: ``imagenet1k-{split}-{i:04d}.tar`` with .jpg/.cls/.json members
    (the json label is deliberately (cls + 1) % 5, so a test sees which one the loader read)
    and an ``_info.json`` listing each split's files and shard lengths."""
    src = synthetic_source(sum(sum(v) for v in splits.values()), 5, SIZE, seed=3)
    entries, index, written = [], 0, []
    for name, lengths in splits.items():
        files = []
        for i, n in enumerate(lengths):
            samples = []
            for _ in range(n):
                s = src.sample(index)
                cls = int(s["cls"])
                meta = {"filename": f"n0000_{index}.JPEG", "label": (cls + 1) % 5, "class_name": "x"}
                samples.append({"__key__": f"{name}_{index:06d}", "jpg": s["jpg"],
                                "cls": str(cls).encode(), "json": json.dumps(meta).encode()})
                index += 1
            files.append(f"imagenet1k-{name}-{i:04d}.tar")
            write_tar(f"{root}/{files[-1]}", samples)
            written += samples
        entries.append({"name": name, "num_samples": sum(lengths), "filenames": files,
                        "shard_lengths": lengths})
    splits_field = entries if as_list else {e["name"]: e for e in entries}
    storage.write_json(f"{root}/_info.json", {"name": "imagenet-1k", "splits": splits_field})
    return written


def labels_of(batches) -> list[int]:
    return [int(x) for _, labels in batches for x in labels]


@pytest.mark.parametrize("as_list", [False, True])
def test_timm_layout_is_read_by_split_name_or_shard_pattern(tmp_path, as_list):
    """Catches: a timm folder refused or read whole (both splits), counts not taken from
    shard_lengths, the split's shards or the pattern's lengths looked up wrongly."""
    root = str(tmp_path / "in1k")
    timm_dataset(root, {"train": [7, 6, 5], "validation": [4, 4]}, as_list=as_list)
    train = Shards.resolve(root, split="train")
    assert train.layout == "timm" and train.total == 18 and train.counts == [7, 6, 5]
    assert [os.path.basename(u) for u in train.urls] == [f"imagenet1k-train-{i:04d}.tar" for i in range(3)]
    assert train.splits == {"train": 18, "validation": 8}
    val = loader(root, LoaderSettings(batch_size=3, num_workers=0),
                 split="validation", image_size=SIZE, train=False, drop_last=False)
    assert sum(len(x) for x, _ in val) == 8
    pattern = loader(f"{root}/imagenet1k-train-{{0001..0002}}.tar", LoaderSettings(batch_size=4, num_workers=0),
                     image_size=SIZE)
    assert len(pattern) == 11 // 4 and pattern.stream.shards.counts == [6, 5]
    with pytest.raises(DatasetError, match=r"pick a split of \['train', 'validation'\]"):
        Shards.resolve(root)
    with pytest.raises(DatasetError, match="no split 'val'"):
        Shards.resolve(root, split="val")


def test_label_key_picks_cls_or_a_json_field(tmp_path):
    """Catches: label_key ignored (json labels differ from cls by one here), a bad key accepted,
    and samples whose json lacks the field not skipped and counted."""
    root = str(tmp_path / "in1k")
    written = timm_dataset(root, {"train": [6, 6]})
    expected_cls = [int(s["cls"]) for s in written]
    kw = dict(split="train", image_size=SIZE, train=False, drop_last=False)
    settings = LoaderSettings(batch_size=4, num_workers=0)
    assert labels_of(loader(root, settings, **kw)) == expected_cls
    json_label = settings.updated(label_key="json:label")
    assert labels_of(loader(root, json_label, **kw)) == [(c + 1) % 5 for c in expected_cls]
    with pytest.raises(UserError, match="label_key 'json:'"):
        loader(root, settings.updated(label_key="json:"), **kw)
    missing = loader(root, settings.updated(label_key="json:meta.label", error_budget=1.0), **kw)
    assert labels_of(missing) == [] and missing.stats.skipped == 12


def test_every_image_member_kind_loads(tmp_path):
    """Catches: jpeg/png/webp members (and upper-case suffixes) not recognised as the image."""
    rng = np.random.default_rng(0)
    samples = []
    for i, fmt in enumerate(["JPEG", "PNG", "WEBP", "JPEG"]):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, fmt)
        suffix = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}[fmt] if i < 3 else "JPG"
        samples.append({"__key__": f"s{i}", suffix: buf.getvalue(), "cls": str(i).encode()})
    write_tar(str(tmp_path / "mixed-0000.tar"), samples)
    batches = loader(str(tmp_path), LoaderSettings(batch_size=4, num_workers=0, error_budget=0.0),
                     image_size=SIZE, train=False, drop_last=False)
    (images, labels), = list(batches)
    assert labels.tolist() == [0, 1, 2, 3] and images.shape == (4, 3, SIZE, SIZE)


def test_plain_tars_are_counted_once_and_the_cache_is_reused(tmp_path):
    """Catches: an info-less folder refused, its count not cached, the cache ignored (the shards
    are overwritten with same-size garbage: a re-count would find 0 samples), or trusted after a
    shard changed size."""
    root = str(tmp_path / "plain")
    src = synthetic_source(23, 4, SIZE)
    for i, (a, b) in enumerate([(0, 10), (10, 20), (20, 23)]):
        write_tar(f"{root}/shard_{i:03d}.tar", [src.sample(j) for j in range(a, b)])
    assert Shards.resolve(root).total is None  # nothing counted unless asked
    batches = loader(root, LoaderSettings(batch_size=4, num_workers=0), image_size=SIZE)
    assert len(batches) == 23 // 4 and batches.stream.shards.counts == [10, 10, 3]
    cache = storage.read_json(f"{root}/{COUNTS}")
    assert {n: e["samples"] for n, e in cache["shards"].items()} == {
        "shard_000.tar": 10, "shard_001.tar": 10, "shard_002.tar": 3}

    for name in ("shard_000.tar", "shard_001.tar"):
        size = os.path.getsize(f"{root}/{name}")
        with open(f"{root}/{name}", "wb") as f:
            f.write(bytes(size))
    again = Shards.resolve(root, count=True)
    assert again.counts == [10, 10, 3] and again.count_source == COUNTS

    with open(f"{root}/shard_002.tar", "ab") as f:
        f.write(bytes(512))  # changes the size: that shard is counted again
    assert Shards.resolve(root, count=True).counts == [10, 10, 3]
    assert Shards.resolve(root, samples=30).total == 30


def test_plain_folder_with_several_sets_needs_a_split(tmp_path):
    """Catches: train and val tars of one folder mixed into one dataset."""
    src = synthetic_source(12, 4, SIZE)
    for name, (a, b) in {"train-0000": (0, 4), "train-0001": (4, 8), "val-0000": (8, 12)}.items():
        write_tar(str(tmp_path / f"{name}.tar"), [src.sample(j) for j in range(a, b)])
    with pytest.raises(DatasetError, match=r"several sets \['train', 'val'\]"):
        Shards.resolve(str(tmp_path))
    val = Shards.resolve(str(tmp_path), split="val", count=True)
    assert [os.path.basename(u) for u in val.urls] == ["val-0000.tar"] and val.total == 4
    with pytest.raises(DatasetError, match="split 'test' matches 0"):
        Shards.resolve(str(tmp_path), split="test")


def test_corrupt_info_json_is_one_line_naming_the_file(tmp_path, capsys):
    """Catches: a bare JSON parse message (no file name) or a traceback for a damaged info file."""
    root = tmp_path / "broken"
    root.mkdir()
    (root / "_info.json").write_text('{"splits": {"train": ')
    with pytest.raises(DatasetError, match=r"broken/_info.json: not valid JSON"):
        loader(str(root), LoaderSettings(batch_size=4, num_workers=2), image_size=SIZE)
    assert main(["shards", "info", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken/_info.json: not valid JSON" in err
    (root / "_info.json").write_text('{"splits": {"train": {"filenames": [], "num_samples": 3}}}')
    with pytest.raises(DatasetError, match=r"splits\[train\]: 'filenames' must be a non-empty list"):
        Shards.resolve(str(root))


def test_shards_info_reports_each_layout(tmp_path, capsys):
    """Catches: `raptor shards info` failing on, or misreporting, a timm or plain layout."""
    timm_dataset(str(tmp_path / "in1k"), {"train": [3, 3], "validation": [2]})
    assert main(["shards", "info", str(tmp_path / "in1k"), "--split", "train",
                 "--label-key", "json:label"]) == 0
    out = capsys.readouterr().out
    assert "timm layout" in out and "train 6, validation 2; reading train" in out
    assert "2 (imagenet1k-train-0000.tar .. imagenet1k-train-0001.tar)" in out
    assert "6 (from _info.json num_samples)" in out and "label (json:label) 1" in out

    src = synthetic_source(5, 4, SIZE)
    write_tar(str(tmp_path / "plain" / "part-0.tar"), [src.sample(j) for j in range(5)])
    assert main(["shards", "info", str(tmp_path / "plain"), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["layout"] == "plain" and found["samples"] is None
    assert found["first_sample"] == {"key": "00000000", "members": ["cls", "jpg"], "image": "jpg", "label": 0}
    assert main(["shards", "info", str(tmp_path / "plain"), "--count"]) == 0
    assert f"5 (from counted from the tar headers ({COUNTS}))" in capsys.readouterr().out
    info = describe(str(tmp_path / "plain"), samples=9)
    assert (info["samples"], info["count_source"]) == (9, "samples argument")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "part-0.tar").write_bytes(b"not a tar" * 100)
    assert main(["shards", "info", str(tmp_path / "junk")]) == 0
    assert "first sample: unreadable, the first shard is damaged (bad " in capsys.readouterr().out


def test_dense_flag_and_classes_come_through_for_raptor_folders(tmp_path):
    """Catches: the raptor layout losing num_classes/dense when resolved through the new layouts."""
    from raptor.data import write_shards

    write_shards(synthetic_source(8, 3, SIZE, dense=True), str(tmp_path / "d"), max_samples=4)
    shards = Shards.resolve(str(tmp_path / "d"))
    assert (shards.layout, shards.num_classes, shards.dense, shards.total) == ("raptor", 3, True, 8)
    with pytest.raises(DatasetError, match="holds one split, 'train'"):
        Shards.resolve(str(tmp_path / "d"), split="val")
    assert torch.is_tensor(next(iter(loader(str(tmp_path / "d"), LoaderSettings(batch_size=4, num_workers=0),
                                            image_size=SIZE, dense=True)))[2])
