"""The stage's final student as a file anyone can load: safetensors + a JSON manifest.

The tensors and the architecture go through the core's :func:`raptor.models.save_student` (the
manifest rides in the safetensors metadata, so the one file rebuilds the student without Ray or
DeepSpeed). The manifest also gets what the service knows: the teacher checkpoint, the stage, the
spec and the final metrics; a copy is written beside the file as ``manifest.json`` for people and
tools that do not read safetensors headers.
"""

from __future__ import annotations

import posixpath
from typing import Any

from raptor import storage
from raptor.config import JobSpec
from raptor.models import Raptor, save_student

STUDENT_FILE = "student.safetensors"
MANIFEST_FILE = "manifest.json"


def export_student(
    student: Raptor,
    folder: str,
    *,
    spec: JobSpec,
    stage: str,
    teacher_url: str,
    metrics: dict[str, float],
) -> str:
    """Write ``folder/student.safetensors`` and ``folder/manifest.json``; returns the file's URL.

    The safetensors file is written last-but-one and the manifest last, so a folder with a
    ``manifest.json`` holds a complete export (the pipeline's "artifact exists" test).
    """
    url = storage.join(folder, STUDENT_FILE)
    manifest: dict[str, Any] = {
        "teacher": {"checkpoint": teacher_url},
        "stage": stage,
        "run": spec.name,
        "spec": spec.model_dump(mode="json"),
        "metrics": metrics,
        "file": posixpath.basename(url),
    }
    full = save_student(student, url, manifest)
    storage.write_json(storage.join(folder, MANIFEST_FILE), full)
    return url
