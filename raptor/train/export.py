"""The stage's final student as a file anyone can load: safetensors + a JSON manifest.

The tensors and the architecture go through the core's :func:`raptor.models.save_student` (the
manifest rides in the safetensors metadata, so the one file rebuilds the student without Ray or
DeepSpeed). The manifest also gets what the job knows: the teacher checkpoint, the stage, its
provenance (the stage's key and the spec fields it was made from) and the final metrics; a copy is
written beside the file as ``manifest.json`` for people and tools that do not read safetensors
headers, with the sha256 of the files written before it (``files``), taken as they were written, so
the service can refuse a student that was truncated or altered afterwards.
"""

from __future__ import annotations

import posixpath
from typing import Any

from raptor import storage
from raptor.models import Raptor, save_student
from raptor.train.job import StageJob

STUDENT_FILE = "student.safetensors"
MANIFEST_FILE = "manifest.json"
HISTORY_FILE = "history.json"


def export_student(
    student: Raptor, job: StageJob, metrics: dict[str, float], history: list[dict[str, float]], *,
    resumed_at: list[int], nonfinite_steps: int = 0,
) -> str:
    """Write ``student.safetensors``, ``history.json`` and ``manifest.json`` under ``job.out_url``.

    ``resumed_at``: the step of every resume from a checkpoint (empty for an uninterrupted stage),
    so what a stage went through is read from its artifact, not from logs; ``nonfinite_steps``: the
    optimizer steps skipped for a non-finite loss or gradient. The manifest is written last, so a
    folder with a ``manifest.json`` holds a complete export. Returns the student file's URL.
    """
    url = storage.join(job.out_url, STUDENT_FILE)
    manifest: dict[str, Any] = {
        **job.manifest,
        "teacher": {"checkpoint": job.teacher.checkpoint},
        "stage": job.stage,
        "metrics": metrics,
        "resumed_at": list(resumed_at),
        "nonfinite_steps": nonfinite_steps,
        "file": posixpath.basename(url),
    }
    with storage.recording() as written:
        full = save_student(student, url, manifest)
        storage.write_json(storage.join(job.out_url, HISTORY_FILE), history)
    files = {posixpath.basename(u): digest for u, digest in written.items()}
    storage.write_json(storage.join(job.out_url, MANIFEST_FILE), {**full, "files": files})
    return url
