"""Shards in real object storage (moto_server over HTTP): distributed reading and bad data."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import uuid

import pytest
import s3fs
import webdataset as wds

from raptor import storage
from raptor.data import (
    LoaderSettings,
    ErrorBudgetExceeded,
    ShardUnavailableError,
    loader,
    read_info,
    synthetic_source,
    write_shards,
)

SIZE = 32  # pixels; small keeps every test quick, the code path is the same at 224


@pytest.fixture(scope="module")
def even(s3_server: str) -> str:
    """96 samples in 8 shards of 12 on S3: divides evenly over 2 ranks x 2 workers x batch 4."""
    bucket = f"raptor-data-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True).mkdir(bucket)
    url = f"s3://{bucket}/even"
    write_shards(synthetic_source(96, 6, SIZE, seed=1), url, max_samples=12, workers=4)
    return url


def fingerprint(image) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()[:16]


def identities(url: str, epoch: int = 0, world_size: int = 2, **settings) -> list[list[str]]:
    """Per rank, the sample fingerprints in delivery order (eval transform: no random crops)."""
    out = []
    for rank in range(world_size):
        batches = loader(url, LoaderSettings(batch_size=4, **settings), image_size=SIZE, train=False, shuffle=True,
                         epoch=epoch, rank=rank, world_size=world_size)
        out.append([fingerprint(img) for images, _ in batches for img in images])
    return out


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(even):
    reference = loader(even, LoaderSettings(batch_size=4, num_workers=0), image_size=SIZE, train=False, drop_last=False)
    everything = [fingerprint(img) for images, _ in reference for img in images]
    assert len(everything) == 96 and len(set(everything)) == 96  # all distinct samples

    for epoch in (0, 1):
        per_rank = identities(even, epoch=epoch, num_workers=2)
        assert [len(r) for r in per_rank] == [48, 48]
        seen = per_rank[0] + per_rank[1]
        assert sorted(seen) == sorted(everything), f"epoch {epoch}: not exactly once"


def test_order_is_a_function_of_seed_and_epoch(even):
    first = identities(even, epoch=0, num_workers=0)
    assert identities(even, epoch=0, num_workers=0) == first
    other_epoch = identities(even, epoch=1, num_workers=0)
    assert other_epoch != first
    assert sorted(sum(other_epoch, [])) == sorted(sum(first, []))
    assert identities(even, epoch=0, num_workers=0, seed=7) != first
    # with loader worker processes too: the same (seed, epoch) gives the same order
    assert identities(even, epoch=3, num_workers=2) == identities(even, epoch=3, num_workers=2)


def test_augmentation_is_reproducible_in_workers(even):
    def run():
        batches = loader(even, LoaderSettings(batch_size=8, num_workers=2, seed=3), image_size=SIZE)
        return [images for images, _ in batches]

    a, b = run(), run()
    assert len(a) == 12 and all((x == y).all() for x, y in zip(a, b))


def test_every_rank_yields_the_same_number_of_batches_with_uneven_shards(s3_bucket):
    url = f"{s3_bucket}/uneven"
    info = write_shards(synthetic_source(100, 5, SIZE), url, max_samples=12)
    assert [s["samples"] for s in info["shards"]] == [12] * 8 + [4]
    for resampled, epoch in ((False, 0), (False, 1), (True, 0)):
        counts = []
        for rank in range(2):
            batches = loader(url, LoaderSettings(batch_size=4, num_workers=2),
                             image_size=SIZE, rank=rank, world_size=2, epoch=epoch, resampled=resampled)
            got = [len(images) for images, _ in batches]
            assert set(got) == {4}
            counts.append(len(got))
        assert counts == [12, 12], (resampled, epoch)


def _rewrite_shard(url: str, damage) -> None:
    members = []
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url))) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m, data in damage(members):
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    storage.write_bytes(url, buf.getvalue())


def _corrupt_first_jpeg(members):
    done = False
    for m, data in members:
        if m.name.endswith(".jpg") and not done:
            data, done = data[:20] + b"\x00garbage" * 50, True
        yield m, data


@pytest.fixture
def damaged(s3_bucket) -> str:
    """6 shards of 10: shard 1 holds one corrupt JPEG, shard 3 is cut in half."""
    url = f"{s3_bucket}/damaged"
    write_shards(synthetic_source(60, 4, SIZE), url, max_samples=10)
    _rewrite_shard(f"{url}/train-000001.tar", _corrupt_first_jpeg)
    cut = storage.read_bytes(f"{url}/train-000003.tar")
    storage.write_bytes(f"{url}/train-000003.tar", cut[: len(cut) // 2])
    return url


def test_corrupt_jpeg_and_truncated_tar_are_skipped_counted_and_logged(damaged, caplog):
    caplog.set_level(logging.WARNING, logger="raptor.data")
    batches = loader(damaged, LoaderSettings(batch_size=4, num_workers=0, error_budget=0.5),
                     image_size=SIZE, train=False, drop_last=False)
    delivered = sum(len(images) for images, _ in batches)
    stats = batches.stats
    assert stats.seen == 60 and stats.shard_errors == 1
    assert 2 <= stats.skipped <= 11  # the corrupt JPEG + what the cut shard of 10 lost
    assert delivered == 60 - stats.skipped
    log = caplog.text
    assert "rank 0 worker 0" in log and "train-000001.tar" in log and "00000010" in log
    assert "train-000003.tar is truncated or corrupt" in log

    # the same counts arrive from loader worker processes, carried along with the batches
    batches = loader(damaged, LoaderSettings(batch_size=4, num_workers=2, error_budget=0.5),
                     image_size=SIZE, steps_per_epoch=10)
    assert sum(1 for _ in batches) == 10
    assert batches.stats.skipped >= stats.skipped and batches.stats.shard_errors >= 1


def test_bad_samples_keep_their_slot_at_any_world_size(damaged):
    """A corrupt JPEG and a shard cut in half, read at 1, 4, 6 and 12 ranks (one sample per rank: a reader
    whose whole part of a step is the bad sample): every step is whole and the same global batch, the bad
    sample's slot taken by the same stand-in. Catches a stand-in that depends on who reads the step (a
    resize would change the batch) and a narrow reader that stops on one bad sample."""
    reference = global_batches(damaged, 1, 24, 0, error_budget=1.0)  # the cut shard loses 6 of 10 each pass
    assert len(reference) == 2 and all(len(step) == 24 for step in reference)
    for world_size, micro, num_workers in ((4, 6, 1), (6, 4, 2), (12, 2, 2)):
        assert global_batches(damaged, world_size, micro, num_workers, error_budget=1.0) == reference, world_size


def test_exceeded_error_budget_stops_with_a_clear_error(damaged):
    batches = loader(damaged, LoaderSettings(batch_size=4, num_workers=1, error_budget=0.0), image_size=SIZE)
    with pytest.raises(ErrorBudgetExceeded, match=r"over the error budget of 0\.0%"):
        for _ in batches:
            pass


def test_missing_shard_fails_clearly_after_retries(even, caplog):
    caplog.set_level(logging.WARNING, logger="raptor.data")
    pattern = even + "/train-{000006..000008}.tar"  # 000008 does not exist
    batches = loader(pattern, LoaderSettings(batch_size=4, num_workers=0),
                     image_size=SIZE, train=False, drop_last=False, retries=2, backoff_s=0.01)
    expected = r"train-000008\.tar could not be opened after 3 tries"
    with pytest.raises(ShardUnavailableError, match=expected):
        for _ in batches:
            pass
    assert caplog.text.count("retrying") == 2


def test_info_and_plain_webdataset_reach_s3_through_fsspec(even):
    info = read_info(even)
    assert info["total"] == 96 and len(info["shards"]) == 8 and info["num_classes"] == 6
    assert read_info(even + "/train-{000000..000007}.tar") == info
    # importing raptor.data registered the s3:// handler for WebDataset's own pipelines too
    samples = list(wds.WebDataset(even + "/train-{000000..000001}.tar", shardshuffle=False))
    assert len(samples) == 24 and {"jpg", "cls"} <= set(samples[0])


def global_batches(url: str, world_size: int, micro: int, num_workers: int, start_step: int = 0,
                   train: bool = True, streams: int | None = 4, order_world_size: int | None = None,
                   error_budget: float = 0.01) -> list[list[str]]:
    """Per step of epoch 0 from ``start_step``, the fingerprints of the global batch: every rank's
    micro-batches of the step, rank after rank (the order DeepSpeed averages them in)."""
    per_rank = []
    for rank in range(world_size):
        settings = LoaderSettings(batch_size=micro, num_workers=num_workers, seed=5, streams=streams,
                                  error_budget=error_budget)
        batches = loader(url, settings, image_size=SIZE, train=train, shuffle=True, rank=rank, world_size=world_size,
                         global_batch=24, order_world_size=order_world_size)
        batches.set_epoch(0, start_step)
        images = [fingerprint(img) for x, _ in batches for img in x]
        share = sum(batches.stream.micro_batches())
        assert all(size <= micro for size in batches.stream.micro_batches())
        per_rank.append([images[i : i + share] for i in range(0, len(images), share)])
    return [sum((rank[step] for rank in per_rank), []) for step in range(len(per_rank[0]))]


def test_the_global_batches_are_the_same_at_any_world_size(even):
    """Catches an order (or augmentation) that depends on the ranks, the loader workers or the micro-batch:
    a run resized mid-stage would then read other samples, or other crops of them, than it would have."""
    reference = global_batches(even, 1, 24, 0)
    assert len(reference) == 4 and all(len(step) == 24 for step in reference)
    # 5 and 7 ranks do not divide the global batch: shares of 4 or 5, and of 3 or 4, samples
    for world_size, micro, num_workers in ((1, 12, 2), (2, 6, 0), (3, 8, 2), (4, 3, 1), (4, 6, 3), (5, 3, 1), (7, 4, 0)):
        assert global_batches(even, world_size, micro, num_workers) == reference, (world_size, micro, num_workers)
    # the default streams: the loader workers of the world size the order is laid out for
    default = global_batches(even, 1, 12, 1, streams=None, order_world_size=2)
    assert default != reference and global_batches(even, 3, 4, 1, streams=None, order_world_size=2) == default


def test_a_resize_mid_epoch_reads_every_sample_exactly_once(even):
    """The audit of a resized epoch: steps 0-1 on 3 ranks, then 2-3 on 2 ranks, or on 4, read every sample
    once (the eval transform: one fingerprint per sample). Catches a resume that restarts or re-deals the
    epoch for the new ranks (samples read twice, others never)."""
    everything = [fingerprint(img) for x, _ in loader(even, LoaderSettings(batch_size=12, num_workers=0),
                                                        image_size=SIZE, train=False, drop_last=False) for img in x]
    first = global_batches(even, 3, 8, 1, train=False)[:2]
    for world_size, micro in ((2, 12), (4, 6)):
        rest = global_batches(even, world_size, micro, 2, start_step=2, train=False)
        read = sum(first + rest, [])
        assert len(read) == 96 and sorted(read) == sorted(everything), world_size


def test_streams_that_cannot_hold_the_order_are_clear_errors(even):
    with pytest.raises(ValueError, match="data.streams=5 does not divide the global batch of 24"):
        loader(even, LoaderSettings(batch_size=12, streams=5), image_size=SIZE, world_size=2, rank=0)
    with pytest.raises(ValueError, match="data.streams=12 needs at least as many shards; there are 8"):
        loader(even, LoaderSettings(batch_size=12, streams=12), image_size=SIZE, world_size=2, rank=0)
    with pytest.raises(ValueError, match="a global batch of 1 leaves some of 2 ranks without a sample"):
        loader(even, LoaderSettings(batch_size=4), image_size=SIZE, world_size=2, rank=0, global_batch=1)
    # more readers than shards: the streams are shared, not refused
    batches = loader(even, LoaderSettings(batch_size=4, num_workers=8), image_size=SIZE, rank=0, world_size=2)
    assert batches.stream.streams == 8 and len(batches) == 12
