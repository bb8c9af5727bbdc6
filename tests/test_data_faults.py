"""Transient read errors in the middle of a shard: retried from where the stream broke, never
counted as corrupt data; real faults injected into real streams (a local file that breaks off
after N bytes, and an S3 endpoint that goes away mid-shard and comes back)."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import fsspec
import pytest
import s3fs
from fsspec.implementations.local import LocalFileSystem

from raptor.data import LoaderSettings, ShardUnavailableError, loader, synthetic_source, write_shards
from raptor.data.gopen import register

SIZE = 32


class BreakingFile:
    """A file whose reads fail with ConnectionResetError once ``limit`` bytes have been read."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.pos = f, limit, 0

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.limit:
            raise ConnectionResetError(f"connection reset by peer (injected at byte {self.pos})")
        n = self.limit - self.pos if n < 0 else min(n, self.limit - self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = self.f.seek(offset, whence)
        return self.pos

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FlakyFileSystem(LocalFileSystem):
    """Local files under ``flaky://``; ``faults[path] = [limit, times]`` makes the next ``times``
    opens of ``path`` break off after ``limit`` bytes."""

    protocol = "flaky"
    faults: dict[str, list[int]] = {}
    opens: dict[str, int] = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://") if isinstance(path, str) else path)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        FlakyFileSystem.opens[path] = FlakyFileSystem.opens.get(path, 0) + 1
        fault = FlakyFileSystem.faults.get(path)
        if fault and fault[1] > 0 and "r" in mode:
            fault[1] -= 1
            return BreakingFile(f, fault[0])
        return f


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
register()  # route flaky:// shards through fsspec, as s3:// is


def fingerprints(batches) -> list[str]:
    return [hashlib.sha1(img.numpy().tobytes()).hexdigest()[:12] for images, _ in batches for img in images]


@pytest.fixture
def flaky(tmp_path) -> str:
    """Three shards of 10 under flaky://; the fault table is cleared after each test."""
    write_shards(synthetic_source(30, 4, SIZE), str(tmp_path / "ds"), max_samples=10)
    yield f"flaky://{tmp_path}/ds"
    FlakyFileSystem.faults.clear()
    FlakyFileSystem.opens.clear()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_read_error_mid_shard_is_retried_not_counted_as_corrupt(flaky, tmp_path, caplog, num_workers):
    """Catches: a connection reset mid-shard treated as a truncated shard (the rest skipped and
    counted, as before), or retried from the start of the shard (samples delivered twice)."""
    caplog.set_level(logging.WARNING, logger="raptor.data")
    kw = dict(image_size=SIZE, train=False, drop_last=False, retries=2, backoff_s=0.01)
    clean = fingerprints(loader(flaky, LoaderSettings(batch_size=4, num_workers=0), **kw))
    shard = f"{tmp_path}/ds/train-000001.tar"
    half = (tmp_path / "ds" / "train-000001.tar").stat().st_size // 2
    FlakyFileSystem.faults[shard] = [half, 1]
    FlakyFileSystem.opens.clear()
    batches = loader(flaky, LoaderSettings(batch_size=4, num_workers=num_workers), **kw)
    assert fingerprints(batches) == clean  # every sample once, in the same order
    stats = batches.stats
    assert (stats.read_retries, stats.skipped, stats.shard_errors, stats.seen) == (1, 0, 0, 30)
    if num_workers == 0:  # (a worker process logs and counts its opens in its own copy)
        assert "ConnectionResetError" in caplog.text and "retrying" in caplog.text
        assert FlakyFileSystem.opens[shard] == 2


def test_read_error_that_persists_fails_naming_the_shard(flaky, tmp_path, monkeypatch):
    """A shard whose reads break 10 times in a row (a reset connection: the store unreachable). Within
    storage.patience the loader waits it out and delivers every sample once, as every other store
    access does; past a patience of 50 ms it stops naming the shard and the patience, as a
    ShardUnavailableError that is also the resumable StorageUnavailable. Catches: an outage passed off
    as bad data (skipped, run goes on with a hole), a loader that gives up after a few tries while
    checkpoints and artifacts wait out the same outage (a training step during an async checkpoint
    upload would fail the stage), and one that retries forever."""
    from raptor import storage
    from raptor.errors import StorageUnavailable

    shard = f"{tmp_path}/ds/train-000002.tar"
    kw = dict(image_size=SIZE, train=False, drop_last=False, retries=2, backoff_s=0.001)
    clean = fingerprints(loader(flaky, LoaderSettings(batch_size=4, num_workers=0), **kw))
    FlakyFileSystem.faults[shard] = [3000, 10]
    batches = loader(flaky, LoaderSettings(batch_size=4, num_workers=0), **kw)
    assert fingerprints(batches) == clean and batches.stats.read_retries == 10

    monkeypatch.setattr(storage, "_patience_s", 0.05)
    FlakyFileSystem.faults[shard] = [3000, 1000]
    batches = loader(flaky, LoaderSettings(batch_size=4, num_workers=0), **{**kw, "backoff_s": 0.01})
    with pytest.raises(ShardUnavailableError, match=r"unreachable for 0s \(storage.patience\) while reading shards") as e:
        list(batches)
    assert isinstance(e.value, StorageUnavailable)
    assert batches.stats.skipped == 0 and batches.stats.shard_errors == 0
    FlakyFileSystem.faults.pop(shard)


class Outage:
    """A TCP proxy in front of the S3 server that, at the first request for a later block of
    ``shard`` (a ranged GET not starting at byte 0: the shard is being streamed), cuts every
    connection and refuses new ones for ``seconds``, then serves again."""

    def __init__(self, upstream: tuple[str, int], shard: str, seconds: float):
        self.upstream, self.shard, self.seconds = upstream, shard.encode(), seconds
        self.down_until, self.outages = 0.0, 0
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.running = True
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while self.running:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                client.close()
                continue
            upstream = socket.create_connection(self.upstream)
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _trips(self, request: bytes) -> bool:
        head = request.lower()
        return (self.outages == 0 and self.shard in request and b"range: bytes=" in head
                and b"range: bytes=0-" not in head)

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if requests and self._trips(chunk):
                    with self.lock:
                        self.outages, self.down_until = 1, time.monotonic() + self.seconds
                    self._cut()
                    return
                dst.sendall(chunk)
        except OSError:
            pass

    def _cut(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def close(self) -> None:
        self.running = False
        self.server.close()
        self._cut()


@contextmanager
def through(outage: Outage, monkeypatch) -> Iterator[None]:
    """S3 reached through the proxy, with small read blocks so a shard takes several requests,
    and the client's own retries (botocore's, and s3fs's nested ones, 25 tries) down to one try,
    so the outage outlasts them as a longer one outlasts the defaults."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{outage.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"default_block_size": 16384})
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        outage.close()
        s3fs.S3FileSystem.clear_instance_cache()


def test_s3_outage_mid_shard_is_survived(s3_server, monkeypatch, caplog):
    """Catches: botocore's connection error (not an OSError) ending the run, or an outage in the
    middle of a shard skipping the rest of it: the S3 endpoint goes away mid-shard for longer
    than s3fs's own retries last, then comes back."""
    caplog.set_level(logging.WARNING, logger="raptor.data")
    bucket = f"raptor-outage-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True).mkdir(bucket)
    url = f"s3://{bucket}/ds"
    write_shards(synthetic_source(24, 4, SIZE), url, max_samples=12)
    settings, kw = LoaderSettings(batch_size=4, num_workers=0), dict(image_size=SIZE, train=False, drop_last=False)
    clean = fingerprints(loader(url, settings, **kw))
    host, port = s3_server.removeprefix("http://").split(":")
    outage = Outage((host, int(port)), shard="train-000001.tar", seconds=4)
    with through(outage, monkeypatch):
        batches = loader(url, settings, retries=4, backoff_s=1.0, **kw)
        assert fingerprints(batches) == clean
    assert outage.outages == 1 and batches.stats.read_retries >= 1
    assert (batches.stats.skipped, batches.stats.shard_errors) == (0, 0)
