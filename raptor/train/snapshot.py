"""Which checkpoint a stage resumes from, read the way Ray Train reads it, without importing Ray.

Ray Train registers a checkpoint in its ``checkpoint_manager_snapshot.json`` only after every rank's
files are persisted; a checkpoint folder that exists but is not registered (a crash during the write)
is never resumed. So the plan asks the snapshot, not the folder listing.
"""

from __future__ import annotations

import json
import re

from raptor import storage

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
_STEP = re.compile(r"checkpoint_step(\d+)$")


def resume_step(checkpoints: str) -> int | None:
    """The step of the checkpoint Ray Train resumes from in the ``checkpoints`` folder, if any."""
    url = storage.join(checkpoints, SNAPSHOT_FILE)
    if not storage.exists(url):
        return None
    latest = json.loads(storage.read_bytes(url)).get("latest_checkpoint_result") or {}
    m = _STEP.match(str(latest.get("checkpoint_dir_name", "")))
    return int(m.group(1)) if m else None
