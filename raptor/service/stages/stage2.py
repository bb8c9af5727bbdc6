"""Stage 2: the stage-1 blocks chained and rolled out over all L layers of the teacher.

Writes ``student.safetensors``, ``manifest.json`` and ``history.json`` (``raptor.service.stages.distill``).
"""

from __future__ import annotations

from raptor.service.stages.distill import training_stage

STAGE = training_stage("stage2", upstream="stage1")
