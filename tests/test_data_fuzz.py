"""Bad shards, fuzzed (hypothesis): whatever the bytes, the loader skips and counts within the error
budget or stops with ErrorBudgetExceeded; it never crashes otherwise and never hangs.

Shards are built from good samples with a few flaws each (corrupt or cut JPEG/PNG bytes, no
image, labels missing, not an integer, negative or out of range, a key repeated, a member written
twice), then maybe damaged as whole files (cut anywhere, bytes overwritten, emptied).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from raptor.data import DatasetError, ErrorBudgetExceeded, LoaderSettings, Shards, loader
from raptor.errors import UserError

SIZE = 16
NUM_CLASSES = 4
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _encoded(fmt: str, seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


JPEG, PNG = _encoded("JPEG", 0), _encoded("PNG", 1)

GOOD = [("jpg", JPEG), ("jpeg", JPEG), ("png", PNG)]
bad_images = st.one_of(
    st.tuples(st.sampled_from(["jpg", "jpeg", "png", "webp"]), st.binary(max_size=300)),
    st.integers(4, len(JPEG) - 1).map(lambda n: ("jpg", JPEG[:n])),
    st.integers(4, len(PNG) - 1).map(lambda n: ("png", PNG[:n])),
    st.tuples(st.integers(0, len(JPEG) - 8), st.binary(min_size=1, max_size=8)).map(
        lambda p: ("jpg", JPEG[: p[0]] + p[1] + JPEG[p[0] + len(p[1]) :])),
)
bad_labels = st.sampled_from([b"", b"x", b"1.5", b"-1", b"99", b"\xff\xfe", b"1e3"])


@st.composite
def mutation(draw, sample: dict[str, bytes], previous: dict[str, bytes] | None) -> dict[str, bytes]:
    """One flaw: a broken image or none, a broken label or none, the previous sample's key (the
    two merge into one sample with duplicated members), or one member written twice."""
    kind = draw(st.sampled_from(["image", "no image", "label", "no label", "key", "twice"]))
    image = next((k for k in sample if k in ("jpg", "jpeg", "png", "webp")), "jpg")
    if kind == "image":
        ext, data = draw(bad_images)
        sample = {k: v for k, v in sample.items() if k != image} | {ext: data}
    elif kind == "no image":
        sample = {k: v for k, v in sample.items() if k != image}
    elif kind == "label":
        sample = sample | {"cls": draw(bad_labels)}
    elif kind == "no label":
        sample = {k: v for k, v in sample.items() if k != "cls"}
    elif kind == "key" and previous is not None:
        sample = sample | {"__key__": previous["__key__"]}
    elif kind == "twice":
        sample = sample | {"__twice__": b""}
    return sample


@st.composite
def shards(draw) -> bytes:
    """A tar of good samples with a few flaws, then maybe damaged as a whole file."""
    n = draw(st.integers(0, 10))
    samples = [{"__key__": f"k{i:02d}", **dict([draw(st.sampled_from(GOOD))]),
                "cls": str(draw(st.integers(0, NUM_CLASSES - 1))).encode()} for i in range(n)]
    for i in draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=3)) if n else []:
        samples[i] = draw(mutation(samples[i], samples[i - 1] if i else None))
    data = _tar_bytes(samples)
    damage = draw(st.sampled_from(["none"] * 5 + ["cut", "overwrite", "empty"]))
    if damage == "cut":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif damage == "overwrite" and data:
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=64))
        data = data[:at] + patch + data[at + len(patch) :]
    elif damage == "empty":
        data = b""
    return data


def _tar_bytes(samples: list[dict[str, bytes]]) -> bytes:
    """Members in sample order; ``__twice__`` writes the sample's label member a second time."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for sample in samples:
            members = [(k, v) for k, v in sample.items() if not k.startswith("__")]
            if "__twice__" in sample and members:
                members.append(members[-1])
            for suffix, data in members:
                info = tarfile.TarInfo(f"{sample['__key__']}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write(folder: str, blobs: list[bytes]) -> None:
    for i, blob in enumerate(blobs):
        with open(os.path.join(folder, f"fuzz-{i:04d}.tar"), "wb") as f:
            f.write(blob)


@pytest.mark.timeout(120)
@FUZZ
@given(
    blobs=st.lists(shards(), min_size=1, max_size=3),
    budget=st.sampled_from([0.0, 0.5, 1.0]),
    decode=st.sampled_from(["cpu", "gpu"]),
)
def test_one_pass_over_fuzzed_shards_counts_every_sample(blobs, budget, decode):
    """Catches: a crash (anything but ErrorBudgetExceeded) on damaged bytes, a sample neither
    delivered nor counted as skipped, bad labels getting through, or the budget not enforced."""
    with tempfile.TemporaryDirectory() as folder:
        _write(folder, blobs)
        batches = loader(folder, LoaderSettings(batch_size=4, num_workers=0, error_budget=budget, decode=decode,
                                                 num_classes=NUM_CLASSES),
                         image_size=SIZE, train=False, drop_last=False, device="cpu")
        delivered: list[int] = []
        try:
            for images, labels in batches:
                assert images.shape[1:] == (3, SIZE, SIZE) and torch.isfinite(images).all()
                delivered += labels.tolist()
        except ErrorBudgetExceeded:
            event("stopped: error budget")
            return
        stats = batches.stats
        some = {True: "some", False: "no"}
        event(f"finished: {some[bool(stats.skipped)]} skipped, {some[bool(stats.shard_errors)]} "
              f"shard errors, {some[bool(delivered)]} delivered")
        assert len(delivered) == stats.seen - stats.skipped
        assert all(0 <= label < NUM_CLASSES for label in delivered)
        assert stats.skipped <= budget * stats.seen


@pytest.mark.timeout(120)
@FUZZ
@given(blobs=st.lists(shards(), min_size=2, max_size=3), decode=st.sampled_from(["cpu", "gpu"]))
def test_training_epochs_over_fuzzed_shards_stay_whole_or_stop(blobs, decode):
    """Catches: a training epoch over bad shards that hangs re-reading shards with nothing usable,
    yields short batches, or crashes instead of stopping with ErrorBudgetExceeded."""
    with tempfile.TemporaryDirectory() as folder:
        _write(folder, blobs)
        batches = loader(folder, LoaderSettings(batch_size=3, num_workers=0, error_budget=1.0, decode=decode,
                                                 num_classes=NUM_CLASSES),
                         image_size=SIZE, steps_per_epoch=3, device="cpu")
        try:
            sizes = [len(labels) for _, labels in batches]
        except ErrorBudgetExceeded:
            event("stopped: no usable samples")
            return
        event(f"finished, {'some' if batches.stats.repeated else 'no'} repeated")
        assert sizes == [3, 3, 3]
        counted = Shards.resolve(folder, count=True)  # counting damaged tars never crashes either
        assert all(c >= 0 for c in counted.counts)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 50) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
infos = st.one_of(
    json_values,
    st.fixed_dictionaries({"splits": json_values}),
    st.fixed_dictionaries({"splits": st.dictionaries(st.sampled_from(["train", "val"]), json_values)}),
    st.fixed_dictionaries({"splits": st.dictionaries(
        st.sampled_from(["train", "val"]),
        st.fixed_dictionaries({"filenames": json_values, "shard_lengths": json_values,
                               "num_samples": json_values}))}),
    st.fixed_dictionaries({"format": st.just("raptor-shards/1"), "shards": json_values,
                           "prefix": json_values, "num_classes": json_values}),
)


@pytest.mark.timeout(60)
@FUZZ
@given(info=infos, raw=st.booleans(), garbage=st.binary(max_size=40),
       split=st.sampled_from([None, "train"]))
def test_fuzzed_info_files_are_one_line_user_errors(info, raw, garbage, split):
    """Catches: a malformed _info.json surfacing as KeyError/TypeError (a traceback, exit 1)
    rather than a DatasetError naming the file."""
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "_info.json"), "wb") as f:
            f.write(garbage if raw else json.dumps(info).encode())
        try:
            Shards.resolve(folder, split=split)
            event("resolved")
        except (DatasetError, UserError) as e:
            event("user error")
            assert "\n" not in str(e)
            if isinstance(e, DatasetError) and "_info.json" not in str(e):
                assert folder in str(e)
