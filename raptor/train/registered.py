"""Which checkpoint a stage resumes from, read the way Ray Train reads it, without importing Ray.

Ray Train registers a checkpoint in its ``checkpoint_manager_snapshot.json`` only after every rank's
files are persisted; a checkpoint folder that exists but is not registered (a crash during the write)
is never resumed. So the plan asks the snapshot, not the folder listing.
"""

from __future__ import annotations

import re

from raptor import storage

CHECKPOINTS = "checkpoints"  # Ray Train's run name: a stage's checkpoints live in <its key folder>/checkpoints
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
CHECKPOINT_DIR = re.compile(r"checkpoint_step(\d+)$")  # a checkpoint folder's name, with its step


def resume_step(checkpoints: str) -> int | None:
    """The step of the checkpoint Ray Train resumes from in the ``checkpoints`` folder, if any."""
    url = storage.join(checkpoints, SNAPSHOT_FILE)
    if not storage.exists(url):
        return None
    latest = storage.read_json(url).get("latest_checkpoint_result") or {}
    m = CHECKPOINT_DIR.match(str(latest.get("checkpoint_dir_name", "")))
    return int(m.group(1)) if m else None
