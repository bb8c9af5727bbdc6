"""The documented JSON schema of ``report.json`` (draft 2020-12), written beside every report.

Kept as Python so it ships inside the package and tests validate real reports against it. Every
section but ``schema_version``, ``run`` and ``plots`` is optional or null: a report of a run
without labels has no probe, one without a discovery stage has no distances.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_CURVE = {"type": "array", "items": _NUM}
_CURVE_OR_NULL = {"type": ["array", "null"], "items": _NUM}
_MATRIX = {"type": "array", "items": _CURVE}
_BOUNDARIES = {"type": "array", "items": {"type": "integer", "minimum": 1}}
_GROUP_CURVES = {
    "type": "object",
    "properties": {g: _CURVE for g in ("cls", "registers", "patches")},
    "required": ["patches"],
    "additionalProperties": False,
}

_BASIN_ROW = {
    "type": "object",
    "properties": {
        "layer": {"type": "integer", "minimum": 0},
        "scale": {"type": "number", "minimum": 0},
        "cos_cls": _NUM,
        "cos_all": _NUM,
        "prediction_held": _NUM_OR_NULL,
    },
    "required": ["layer", "scale", "cos_cls", "cos_all", "prediction_held"],
}

_DYNAMICS = {
    "type": "object",
    "description": "dynamics of one model's trajectories (METHOD.md section 8)",
    "properties": {
        "depth": {"type": "integer", "minimum": 1},
        "num_samples": {"type": "integer", "minimum": 1},
        "gamma": {**_GROUP_CURVES, "description": "directional convergence <x^_l, x^_L>, layers 0..L"},
        "gamma_midpoint": {"type": "object", "additionalProperties": _NUM_OR_NULL},
        "speed": {**_GROUP_CURVES, "description": "angular speed arccos <x^_{l+1}, x^_l> in radians, steps producing layers 1..L"},
        "speed_deg": _GROUP_CURVES,
        "patch_stable_rank": {**_CURVE, "description": "||U||_F^2 / ||U||_2^2 of the patch updates, per step"},
        "patch_coherence": {**_CURVE_OR_NULL, "description": "mean pairwise cosine of the patch updates, per step"},
        "speed_jumps": {"type": "object"},
        "silhouette": {**_NUM_OR_NULL, "description": "class-basin separation of the final cls directions (cosine silhouette)"},
        "basin": {"type": "array", "items": _BASIN_ROW},
    },
    "required": ["depth", "num_samples", "gamma", "speed", "patch_stable_rank", "patch_coherence", "silhouette", "basin"],
}

_FIDELITY = {
    "type": "object",
    "description": "the student's states against the teacher's, all tokens, per layer (raptor.distill.fidelity)",
    "properties": {
        "layers": {"type": "array", "items": {"type": "integer", "minimum": 1}},
        "r2": _CURVE,
        "cosine": _CURVE,
        "update_r2": _CURVE,
        "rel_error": _CURVE,
    },
    "required": ["layers", "r2", "cosine", "update_r2", "rel_error"],
}

_ACCURACY = {
    "type": "object",
    "properties": {"top1": _NUM, "top5": _NUM_OR_NULL},
    "required": ["top1"],
}

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "raptor analysis report",
    "type": "object",
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "run": {
            "type": "object",
            "properties": {"name": {"type": ["string", "null"]}, "url": {"type": ["string", "null"]}, "created": {"type": "string"}},
            "required": ["created"],
        },
        "teacher": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "depth": {"type": "integer", "minimum": 1},
                "width": {"type": "integer", "minimum": 1},
                "num_registers": {"type": "integer", "minimum": 0},
                "num_patches": {"type": "integer", "minimum": 1},
            },
            "required": ["depth", "width"],
        },
        "boundaries": {**_BOUNDARIES, "description": "1-based last layer of every block but the last"},
        "k": {"type": "integer", "minimum": 1},
        "discovery": {
            "type": ["object", "null"],
            "properties": {"metric": {"type": ["string", "null"]}, "distances": _MATRIX, "boundaries": _BOUNDARIES},
            "required": ["distances"],
        },
        "probe": {
            "type": ["object", "null"],
            "description": "linear probes on the readout: the teacher, the student with the teacher's head, the student's own probe",
            "properties": {
                "teacher": _ACCURACY,
                "student": _ACCURACY,
                "student_share": {**_NUM_OR_NULL, "description": "student top-1 / teacher top-1"},
            },
            "required": ["teacher", "student"],
        },
        "fidelity": {"oneOf": [_FIDELITY, {"type": "null"}]},
        "dynamics": {
            "type": "object",
            "properties": {"teacher": _DYNAMICS, "student": {"oneOf": [_DYNAMICS, {"type": "null"}]}},
            "required": ["teacher"],
        },
        "studies": {
            "type": "object",
            "properties": {
                "layer_swap": {
                    "type": "object",
                    "properties": {"layers": {"type": "array"}, "cosine": _MATRIX, "top1": {"oneOf": [_MATRIX, {"type": "null"}]}},
                    "required": ["layers", "cosine", "top1"],
                },
                "partition": {"type": "object", "required": ["boundaries", "runs", "summary"]},
                "ablation": {"type": "array", "items": {"type": "object", "required": ["row", "update_r2_mean", "top1"]}},
                "dense": {"type": "object"},
            },
        },
        "plots": {"type": "object", "additionalProperties": {"type": "string", "pattern": r"^plots/[A-Za-z0-9_.-]+\.png$"}},
    },
    "required": ["schema_version", "run", "teacher", "dynamics", "plots"],
}
