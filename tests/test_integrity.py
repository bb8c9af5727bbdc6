"""The pieces of the reliability layer, without a training run: retries, checksums, weights-only loads.

The end-to-end faults (nodes killed, S3 down mid-stage, corrupt checkpoints, NaNs) are in
tests/test_faults.py; these pin each mechanism down in seconds, against the real S3 server.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path

import pytest
import torch

from raptor import storage
from raptor.errors import CorruptArtifact, StorageUnavailable
from raptor.train import integrity
from tests.s3proxy import S3Relay


@pytest.fixture
def relayed(s3_server, s3_bucket):
    """A bucket reached through a relay that the test can take down; yields (relay, bucket URL)."""
    import s3fs

    relay = S3Relay(int(s3_server.rsplit(":", 1)[1]))
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = relay.url
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield relay, s3_bucket
    finally:
        relay.close()
        os.environ["AWS_ENDPOINT_URL"] = saved
        s3fs.S3FileSystem.clear_instance_cache()


def test_storage_waits_out_an_outage_shorter_than_its_patience(relayed):
    """Catches a write that fails (or is lost) when the object store is down for a few seconds."""
    relay, bucket = relayed
    url = f"{bucket}/during-outage.json"
    relay.down()
    threading.Timer(4.0, relay.up).start()
    t0 = time.monotonic()
    storage.retry(lambda: storage.write_json(url, {"a": 1}), "the test write", patience_s=120)
    assert time.monotonic() - t0 >= 4.0
    assert storage.read_json(url) == {"a": 1}


def test_storage_stops_with_one_line_past_its_patience(relayed):
    """Catches an outage that hangs forever or surfaces as botocore's traceback instead of StorageUnavailable."""
    relay, bucket = relayed
    relay.down()
    storage.set_patience(2)
    try:
        with pytest.raises(StorageUnavailable, match=r"^reading s3://.*: object storage unreachable for \d+s") as e:
            storage.read_bytes(f"{bucket}/x")
    finally:
        storage.set_patience(storage.DEFAULT_PATIENCE_S)
    assert "\n" not in str(e.value)


def test_missing_files_and_denied_access_are_not_retried(tmp_path):
    """Catches a retry loop that waits out the patience on errors no retry can fix."""
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "nope"))
    assert time.monotonic() - t0 < 1


def test_checksums_are_recorded_as_files_are_written(tmp_path):
    """Catches a recording that misses nested writes or hashes something other than the bytes written."""
    with storage.recording() as outer:
        storage.write_bytes(str(tmp_path / "a.bin"), b"abc")
        with storage.recording() as inner:
            storage.write_json(str(tmp_path / "b.json"), {"x": 1})
    assert inner == {str(tmp_path / "b.json"): storage.sha256((tmp_path / "b.json").read_bytes())}
    assert outer[str(tmp_path / "a.bin")] == storage.sha256(b"abc") and len(outer) == 2
    assert storage.checksum(str(tmp_path / "a.bin")) == storage.sha256(b"abc")


def test_a_corrupt_json_file_is_named_in_one_line(tmp_path):
    """Catches a bare JSONDecodeError (no file name) from an index or marker that was truncated."""
    bad = tmp_path / "run.json"
    bad.write_text('{"stages": ')
    with pytest.raises(CorruptArtifact, match=rf"^{bad}: not valid JSON"):
        storage.read_json(str(bad))


def _checkpoint(folder: Path, ranks: int = 2) -> None:
    for rank in range(ranks):
        part = folder / f"rank{rank}"
        part.mkdir(parents=True, exist_ok=True)
        (part / f"shard{rank}.pt").write_bytes(os.urandom(1000))
        integrity.write_checksums(str(part), rank=rank, world_size=ranks, step=20)
    for rank in range(ranks):  # Ray merges the ranks' folders into one
        for f in (folder / f"rank{rank}").iterdir():
            f.rename(folder / f.name)
        (folder / f"rank{rank}").rmdir()


def test_a_whole_checkpoint_verifies_and_each_fault_is_named(tmp_path):
    """Catches verification that passes a bit-flipped, truncated or missing shard, or a missing rank."""
    _checkpoint(tmp_path)
    assert integrity.verify(str(tmp_path)) is None
    data = bytearray((tmp_path / "shard1.pt").read_bytes())
    data[10] ^= 1
    (tmp_path / "shard1.pt").write_bytes(bytes(data))
    assert integrity.verify(str(tmp_path)) == "shard1.pt fails its sha256 from checksums_rank1.json (truncated, corrupted or replaced)"
    (tmp_path / "shard1.pt").unlink()
    assert integrity.verify(str(tmp_path)).startswith("shard1.pt is missing")
    (tmp_path / "checksums_rank1.json").unlink()
    assert integrity.verify(str(tmp_path)).startswith("checksums_rank1.json is missing")
    (tmp_path / "checksums_rank0.json").unlink()
    assert integrity.verify(str(tmp_path)).startswith("checksums_rank0.json is missing")


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    """Catches a load path that unpickles arbitrary objects (torch.load(weights_only=False), as DeepSpeed's own)."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="^mp_rank_00_model_states.pt is not plain weights"):
        integrity.load_weights_only(str(path))
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, path)
    assert integrity.load_weights_only(str(path))["step"] == 3


def test_the_plan_remakes_an_artifact_that_fails_its_checksum(tmp_path):
    """Catches a corrupt upstream artifact that a stage would load because its stage.json says done."""
    from raptor.service.engine.artifacts import corrupt_file
    from raptor.service.engine.pipeline import plan
    from tests.test_stage_graph import _finish, _spec

    spec = _spec(tmp_path)
    _finish(spec, "discovery")
    steps, run_folder = plan(spec)
    folder = run_folder.folder("distances")
    storage.write_bytes(storage.join(folder, "distances.npy"), b"matrix")
    marker = storage.join(folder, "stage.json")
    storage.write_json(marker, {**storage.read_json(marker), "files": {"distances.npy": storage.sha256(b"matrix")}})
    assert corrupt_file(folder) is None
    assert {s.name: s.status for s in plan(spec)[0]}["distances"] == "done"
    storage.write_bytes(storage.join(folder, "distances.npy"), b"matrIx")
    assert "distances.npy does not match the sha256" in corrupt_file(folder)
    status = {s.name: (s.status, s.why) for s in plan(spec)[0]}
    assert status["distances"][0] == "will run" and status["distances"][1].startswith("corrupt: ")
    assert status["teacher"][0] == "done"  # verified and intact


def test_ray_trains_checkpoint_filesystem_waits_out_an_outage(relayed, tmp_path):
    """Catches checkpoint uploads and downloads (pyarrow.fs.copy_files, as Ray Train makes them) that
    fail, or leave a torn object, when the object store drops out in the middle of them."""
    import pyarrow.fs

    from raptor.train import objectstore

    relay, bucket = relayed
    local = tmp_path / "checkpoint"
    (local / "step").mkdir(parents=True)
    files = {"step/shard.pt": os.urandom(300_000), "latest": b"step"}
    for name, data in files.items():
        (local / name).write_bytes(data)
    fs, path = objectstore.filesystem(f"{bucket}/checkpoints/checkpoint_step00000020", patience_s=120)
    relay.down()
    threading.Timer(3.0, relay.up).start()
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)
    relay.down()
    threading.Timer(3.0, relay.up).start()
    back = tmp_path / "back"
    pyarrow.fs.copy_files(path, str(back), source_filesystem=fs)
    assert {name: (back / name).read_bytes() for name in files} == files
    assert len(relay.outages) == 2
