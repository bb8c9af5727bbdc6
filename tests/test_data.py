"""Shard writer, sources, generator, transforms and CLI (local folders and the S3 server)."""

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
from raptor.data import (
    LoaderSettings,
    image_transform,
    imagefolder_source,
    listfile_source,
    loader,
    read_info,
    resolve_rank,
    synthetic_source,
    write_shards,
)
from raptor.data.streaming import default_streams


def tar_members(url: str) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_synthetic_samples_are_deterministic_labelled_and_dense():
    src = synthetic_source(30, num_classes=12, size=40, seed=5, dense=True)
    assert src.sample(7) == synthetic_source(30, 12, 40, seed=5, dense=True).sample(7)
    assert src.sample(7)["jpg"] != synthetic_source(30, 12, 40, seed=6, dense=True).sample(7)["jpg"]
    assert len(set(src.classes)) == 12
    for i in (0, 13, 29):
        s = src.sample(i)
        label = int(s["cls"])
        assert label == i % 12
        assert Image.open(io.BytesIO(s["jpg"])).size == (40, 40)
        seg = np.asarray(Image.open(io.BytesIO(s["seg.png"])))
        assert set(np.unique(seg)) == {0, label + 1}  # background and this class's object
        depth = np.load(io.BytesIO(s["depth.npy"]))
        assert depth.shape == (40, 40) and depth[seg > 0].mean() < depth[seg == 0].mean()
    with pytest.raises(ValueError, match="num_classes must be 2..40"):
        synthetic_source(10, num_classes=41)


def test_info_matches_shards_and_rerun_skips_finished_shards(tmp_path):
    out = str(tmp_path / "ds")
    info = write_shards(synthetic_source(50, 5, 32), out, max_samples=16, workers=2)
    assert [s["samples"] for s in info["shards"]] == [16, 16, 16, 2]
    assert info["total"] == 50 and read_info(out) == info
    assert storage.read_json(f"{out}/classes.json") == info["classes"]
    keys = []
    for shard in info["shards"]:
        members = tar_members(f"{out}/{shard['name']}")
        assert len(members) == 2 * shard["samples"]  # jpg + cls per sample
        assert os.path.getsize(f"{out}/{shard['name']}") == shard["bytes"]
        keys += sorted(m.split(".")[0] for m in members if m.endswith(".cls"))
    assert keys == [f"{i:08d}" for i in range(50)]

    stamps = {n: os.stat(f"{out}/{n}").st_mtime_ns for n in os.listdir(out) if n.endswith(".tar")}
    os.remove(f"{out}/train-000002.tar")
    assert write_shards(synthetic_source(50, 5, 32), out, max_samples=16) == info
    for name, stamp in stamps.items():
        changed = os.stat(f"{out}/{name}").st_mtime_ns != stamp
        assert changed == (name == "train-000002.tar"), name

    with pytest.raises(ValueError, match="already holds another dataset"):
        write_shards(synthetic_source(50, 5, 32), out, max_samples=10)
    info = write_shards(synthetic_source(50, 5, 32), out, max_samples=10, overwrite=True)
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == [
        f"train-{i:06d}.tar" for i in range(5)
    ]


def _imagefolder(root, classes=("zebra", "apple", "mango"), per_class=3):
    for c, name in enumerate(classes):
        os.makedirs(root / name / "sub")
        for i in range(per_class):
            colour = (40 * c + 10 * i, 100, 200 - 30 * c)
            path = root / name / ("sub" if i == 0 else "") / f"{name}_{i}.JPEG"
            Image.new("RGB", (20 + i, 24), colour).save(path, "JPEG")
        (root / name / "notes.txt").write_text("not an image")


def test_imagefolder_to_s3_keeps_labels_and_bytes(tmp_path, s3_bucket):
    _imagefolder(tmp_path / "src")
    src = imagefolder_source(str(tmp_path / "src"))
    assert src.classes == ["apple", "mango", "zebra"] and len(src) == 9
    out = f"{s3_bucket}/folder"
    info = write_shards(src, out, max_samples=4)
    assert storage.read_json(f"{out}/classes.json") == ["apple", "mango", "zebra"]
    found = 0
    for shard in info["shards"]:
        members = tar_members(f"{out}/{shard['name']}")
        for name, data in members.items():
            if name.endswith(".jpg"):
                key = name[: -len(".jpg")]
                cls_name = key.split("_", 1)[1].rsplit("_", 1)[0]  # 00000003_mango_0 -> mango
                assert int(members[f"{key}.cls"]) == src.classes.index(cls_name)
                original = next(tmp_path.glob(f"src/{cls_name}/**/{key.split('_', 1)[1]}.JPEG"))
                assert data == original.read_bytes()  # stored as is, not re-encoded
                found += 1
    assert found == 9
    with pytest.raises(FileNotFoundError, match="no such folder"):
        imagefolder_source(str(tmp_path / "missing"))


def test_listfile_source_and_reencoding(tmp_path):
    (tmp_path / "img").mkdir()
    lines = []
    for i, label in enumerate(["dog", "cat", "dog", "owl"]):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png\t{label}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    src = listfile_source(str(tmp_path / "list.txt"))
    assert src.classes == ["cat", "dog", "owl"] and src.labels == [1, 0, 1, 2]
    info = write_shards(src, str(tmp_path / "out"), reencode=90)
    members = tar_members(str(tmp_path / "out" / info["shards"][0]["name"]))
    jpgs = [data for name, data in members.items() if name.endswith(".jpg")]
    assert len(jpgs) == 4 and all(Image.open(io.BytesIO(d)).format == "JPEG" for d in jpgs)

    (tmp_path / "bad.txt").write_text("img/0.png\tdog\nimg/1.png\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected 'path<TAB>label'"):
        listfile_source(str(tmp_path / "bad.txt"))


def test_max_bytes_bounds_shards(tmp_path):
    _imagefolder(tmp_path / "src", per_class=4)
    src = imagefolder_source(str(tmp_path / "src"))
    limit = 3 * max(src.sizes)
    info = write_shards(src, str(tmp_path / "out"), max_bytes=limit)
    assert len(info["shards"]) > 1
    sizes, start = [], 0
    for s in info["shards"]:
        sizes.append(sum(src.sizes[start : start + s["samples"]]))
        start += s["samples"]
    assert max(sizes) <= limit and start == 12


def test_dense_batches_carry_matching_masks_and_depth(tmp_path):
    out = str(tmp_path / "dense")
    write_shards(synthetic_source(24, 4, 48, dense=True), out, max_samples=8)
    batches = loader(out, LoaderSettings(batch_size=6, num_workers=0), image_size=28, dense=True, patch_size=14)
    assert len(batches) == 4
    for images, labels, masks, depth in batches:
        assert images.shape == (6, 3, 28, 28) and images.dtype == torch.float32
        assert masks.shape == (6, 28, 28) and masks.dtype == torch.long
        assert depth.shape == (6, 28, 28) and depth.dtype == torch.float32
        for label, mask in zip(labels, masks):
            assert set(mask.unique().tolist()) <= {0, int(label) + 1}


def test_transforms_follow_dinov2():
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    out = image_transform(224, train=False)(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert -2.2 < out.min() and out.max() < 2.7  # ImageNet-standardised range
    assert image_transform(224, train=True)(image).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        image_transform(100, train=True, patch_size=14)


def test_default_streams_and_rank_resolution(tmp_path):
    """Catches default streams that stop dividing the global batch or exceed the shards, and a rank not
    taken from the process group."""
    assert default_streams(64, 2, 2, shards=None) == 4  # 2 ranks x 2 loader workers
    assert default_streams(64, 2, 3, shards=None) == 4  # 6 readers: rounded down to a divisor of 64
    assert default_streams(64, 8, 4, shards=10) == 8  # at most one per shard
    assert default_streams(30, 30, 0, shards=None) == 30 and default_streams(30, 1, 0, shards=None) == 1
    assert resolve_rank(1, 4) == (1, 4) and resolve_rank(None, None) == (0, 1)
    with pytest.raises(ValueError, match="both rank and world_size"):
        resolve_rank(1, None)
    with pytest.raises(ValueError, match="outside world_size"):
        resolve_rank(2, 2)
    torch.multiprocessing.start_processes(
        _rank_in_process_group, args=(str(tmp_path),), nprocs=2, start_method="fork"
    )
    found = sorted(json.loads(p.read_text()) for p in tmp_path.glob("rank-*.json"))
    assert found == [[0, 2], [1, 2]]


def _rank_in_process_group(rank: int, folder: str) -> None:
    """A real 2-process gloo group: the loader must pick up its rank without being told."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=2
    )
    try:
        with open(f"{folder}/rank-{rank}.json", "w") as f:
            json.dump(list(resolve_rank(None, None)), f)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_cli_generate_info_bench_and_errors(tmp_path, capsys):
    """Catches a shards/bench command that fails with a traceback or a message that does not name the bad
    argument (a loader setting out of range is reported by its flag, in one line)."""
    out = str(tmp_path / "gen")
    assert main(["shards", "generate", out, "--samples", "40", "--classes", "4",
                 "--size", "32", "--max-samples", "10"]) == 0
    assert "40 samples, 4 classes, 4 shards" in capsys.readouterr().out
    assert main(["shards", "info", out]) == 0
    assert main(["data", "bench", out, "--size", "28", "--batch-size", "8", "--batches", "3",
                 "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples"] == 24 and result["samples_per_s_per_worker"] > 0
    assert main(["shards", "imagefolder", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raptor shards: error:") and "no such folder" in err
    assert len(err.splitlines()) == 1
    assert main(["data", "bench", str(tmp_path / "nope")]) == 2
    capsys.readouterr()
    for flag, value in (("--batch-size", "0"), ("--workers", "-1")):  # a loader setting out of range: its flag
        assert main(["data", "bench", out, "--size", "28", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{flag} {value}:" in err, err


def test_write_a_list_of_ready_samples(tmp_path):
    src = synthetic_source(6, 3, 24)
    samples = [src.sample(i) for i in range(6)]
    with pytest.raises(ValueError, match="needs classes"):
        write_shards(samples, str(tmp_path / "a"))
    info = write_shards(samples, str(tmp_path / "a"), classes=src.classes, prefix="val-v2")
    assert info["shards"][0]["name"] == "val-v2-000000.tar" and info["total"] == 6
    batches = loader(str(tmp_path / "a"), LoaderSettings(batch_size=6, num_workers=0), image_size=24)
    (images, labels), = list(batches)
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
