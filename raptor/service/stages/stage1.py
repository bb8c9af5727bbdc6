"""Stage 1: all k student blocks trained at once, each on its teacher segment from the discovered boundaries.

Writes ``student.safetensors``, ``manifest.json`` and ``history.json`` (``raptor.service.stages.distill``).
"""

from __future__ import annotations

from raptor.service.stages.distill import training_stage

STAGE = training_stage("stage1", upstream="discovery")
