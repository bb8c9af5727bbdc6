"""When a training stage checkpoints: periodically, at the end, and at the first check after a preemption notice.

Ray Train's notices (``ray.train.get_preemption_info``) are played from a script here; the end-to-end
run on a real cluster with a real node drain is ``tests/test_faults.py``'s elastic test.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.train.v2.api.preemption import PreemptionInfo

from raptor.train import checkpoint
from raptor.train.settings import StorageSettings


def _checkpointer(monkeypatch, notices: dict[int, dict[str, list[int]]], **settings) -> tuple[checkpoint.Checkpointer, list[int]]:
    """A rank-0 checkpointer whose Ray Train context announces ``notices[call]`` (node -> ranks) at that call."""
    calls: list[int] = []

    def info():
        calls.append(len(calls))
        nodes = notices.get(len(calls) - 1)
        return PreemptionInfo(deadline_ms=None, preempted_node_to_ranks=nodes) if nodes else None

    ctx = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 2)
    monkeypatch.setattr(checkpoint.ray.train, "get_context", lambda: ctx)
    monkeypatch.setattr(checkpoint.ray.train, "get_preemption_info", info)
    monkeypatch.setattr(checkpoint.Checkpointer, "_new_engine", lambda self: None)
    settings = StorageSettings(checkpoint_interval=20, **settings)
    return checkpoint.Checkpointer(settings, fresh=lambda: None, student=lambda: None), calls


def test_a_preemption_notice_brings_a_checkpoint_at_the_next_step_boundary(monkeypatch, caplog):
    """Node a is announced during step 7, node b during step 12 (while a is still draining): steps 7 and
    12 end with a checkpoint, besides the periodic 20 and the last; a notice already acted on brings no
    other. Catches a notice ignored (a preemption then loses everything since the last periodic
    checkpoint), one that checkpoints every step until the node goes, and a rank that skips the check
    (the check is a collective: every rank must make it at every step)."""
    still = {"a": [1]}
    notices = {6: still, **{i: still for i in range(7, 11)}, 11: {"a": [1], "b": [0]}, 12: {"a": [1], "b": [0]}}
    ckpt, calls = _checkpointer(monkeypatch, notices)
    with caplog.at_level("WARNING", logger=checkpoint.__name__):
        due = [step for step in range(1, 31) if ckpt.due(step, last=step == 30)]
    assert due == [7, 12, 20, 30]
    assert len(calls) == 30  # one check per step, also at steps that checkpoint anyway
    assert [r.getMessage().split(" will be")[0] for r in caplog.records] == ["node(s) a (ranks [1])", "node(s) b (ranks [0, 1])"]
    assert "checkpoint at step 12" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("check", [1, 4])
def test_the_notice_is_checked_every_preemption_check_steps(monkeypatch, check):
    """With storage.preemption_check=4 the notice of step 5 is acted on at step 8, the next check.
    Catches the setting ignored (a collective every step where a user asked for fewer)."""
    ckpt, calls = _checkpointer(monkeypatch, {i: {"a": [0]} for i in range(20)}, preemption_check=check)
    due = [step for step in range(5, 13) if ckpt.due(step, last=False)]
    assert due == [5 if check == 1 else 8]
    assert len(calls) == (8 if check == 1 else 2)  # steps 8 and 12


def test_the_checkpoint_before_a_preemption_uploads_before_training_goes_on(monkeypatch, tmp_path):
    """Periodic checkpoints upload in the background (storage.upload: async); the one a notice asked for
    waits for its upload, so it is in storage before the node can go; sync waits for every one.
    Catches a checkpoint the preempted node takes with it (an async upload still under way)."""
    modes: list[str] = []
    monkeypatch.setattr(checkpoint.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(checkpoint.consolidated, "gather", lambda engine, student: {"param/w": 1})
    monkeypatch.setattr(checkpoint.integrity, "write_checksums", lambda *a, **k: None)
    monkeypatch.setattr(checkpoint.ray.train, "report", lambda metrics, checkpoint, checkpoint_dir_name,
                        checkpoint_upload_mode, delete_local_checkpoint_after_upload: modes.append(checkpoint_upload_mode.name))
    for upload, expected in (("async", ["ASYNC", "SYNC", "ASYNC"]), ("sync", ["SYNC", "SYNC", "SYNC"])):
        modes.clear()
        ckpt, _ = _checkpointer(monkeypatch, {1: {"a": [1]}}, upload=upload)
        ckpt.engine = SimpleNamespace(global_samples=0, skipped_steps=0, zero_optimization_stage=lambda: 2)
        assert not ckpt.due(1, last=False)
        ckpt.save(1, {}, checkpoint.Resumed())  # as a periodic one
        assert ckpt.due(2, last=False)  # the notice
        ckpt.save(2, {}, checkpoint.Resumed())
        ckpt.save(3, {}, checkpoint.Resumed())
        assert modes == expected, upload
