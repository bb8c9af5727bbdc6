"""Student export: safetensors with the k blocks + a JSON manifest; loads without Ray/DeepSpeed.

Decision: the student file holds ONLY the k blocks (incl. their depth-scaling MLPs) -- the
parameters the student owns. The teacher's embedding and final norm are not copied; the manifest
records how to rebuild the teacher (``manifest["teacher"]``: timm name, img_size, model_kwargs and
the checkpoint URL it was loaded from). :func:`rebuild_student` returns the full working student
(blocks + teacher) from the file alone when that checkpoint URL is set, or given a teacher.

Manifest (JSON in the safetensors metadata under ``manifest``):
    format: "raptor-student", version: 1,
    student: {boundaries, depth, block: {dim, num_heads, mlp, mlp_hidden, qkv_bias, ls_init,
              depth_scaling, norm_eps}, layout: {...}},
    teacher: {name, img_size, model_kwargs, checkpoint} (when a teacher is attached),
    ... plus whatever the caller passes (run id, stage, metrics, spec).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from raptor.models import checkpoints as ckpt
from raptor.models.student import Raptor, RaptorBlock
from raptor.models.teacher import Teacher, TokenGeometry


def student_manifest(student: Raptor) -> dict[str, Any]:
    blk = student.blocks[0]
    block_cfg = dict(
        dim=blk.dim,
        num_heads=blk.attn.num_heads,
        mlp=blk.mlp.kind,
        mlp_hidden=blk.mlp.fc2.in_features,
        qkv_bias=blk.attn.qkv.bias is not None,
        depth_scaling=blk.depth_mlp is not None,
        norm_eps=float(blk.norm1.eps),
    )
    man: dict[str, Any] = {
        "format": ckpt.STUDENT_FORMAT,
        "version": 1,
        "student": {
            "boundaries": list(student.boundaries),
            "depth": student.depth,
            "k": student.k,
            "block": block_cfg,
            "layout": student.geometry.to_dict(),
        },
    }
    t = student.teacher
    if t is not None:
        man["teacher"] = {
            "name": t.name,
            "img_size": t.img_size,
            "model_kwargs": t.model_kwargs,
            "checkpoint": t.checkpoint,
        }
    return man


def save_student(student: Raptor, url: str, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the student's ``state_dict`` (k blocks) to ``url`` (safetensors); returns the manifest.

    ``manifest`` entries are merged on top of the architecture description (a caller may set
    ``manifest["teacher"]["checkpoint"]`` when the teacher object does not know its URL).
    """
    man = student_manifest(student)
    for k, v in (manifest or {}).items():
        if isinstance(v, dict) and isinstance(man.get(k), dict):
            man[k] = {**man[k], **v}
        else:
            man[k] = v
    meta = {"format": ckpt.STUDENT_FORMAT, "manifest": json.dumps(man, sort_keys=True, default=str)}
    ckpt.save_safetensors(url, student.state_dict(), meta)
    return man


def load_student(url: str, teacher: Teacher | None = None) -> tuple[Raptor, dict[str, Any]]:
    """Rebuild the Raptor (blocks only; ``teacher`` attached if given) -> (student, manifest)."""
    sd, meta = ckpt.read_checkpoint(url)
    if meta.get("format") != ckpt.STUDENT_FORMAT or "manifest" not in meta:
        raise ckpt.CheckpointError(f"{url} is not a raptor student export")
    man, s = _manifest(meta["manifest"], url)
    with torch.device("meta"):  # a manifest that lies about the sizes allocates nothing before it is caught
        ckpt.check_fits(_build(s, url), sd, url)
    student = _build(s, url)
    student.load_state_dict(sd, strict=True)  # checked above
    student.config = dict(s["block"])
    if teacher is not None:
        try:
            student.attach(teacher)
        except ValueError as e:
            raise ckpt.CheckpointError(f"{url}: a student of another teacher ({e})") from None
        student.to(teacher.device)
    return student, man


def _manifest(text: str, url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The export's manifest and its ``student`` section, checked for the shape :func:`_build` reads."""
    try:
        man = json.loads(text)
    except ValueError as e:
        raise ckpt.CheckpointError(f"{url}: its manifest is not valid JSON ({e})") from None
    s = man.get("student") if isinstance(man, dict) else None
    if not (isinstance(s, dict) and isinstance(s.get("layout"), dict) and isinstance(s.get("block"), dict)
            and isinstance(s.get("boundaries"), list) and s.get("k") == len(s["boundaries"]) + 1):
        raise ckpt.CheckpointError(
            f"{url}: its manifest needs student.layout and student.block (objects), student.boundaries "
            "(a list) and student.k (one more than the boundaries)"
        )
    return man, s


def _build(s: dict[str, Any], url: str) -> Raptor:
    """The (untrained) Raptor the manifest's ``student`` section describes; values it cannot take are the file's fault."""
    try:
        geometry = TokenGeometry(**s["layout"])
        return Raptor([RaptorBlock(**s["block"]) for _ in range(s["k"])], s["boundaries"], geometry)
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"{url}: its manifest does not describe a student ({e})") from None


def rebuild_student(url: str, teacher: Teacher | None = None) -> tuple[Raptor, Teacher, dict[str, Any]]:
    """The full student (blocks + the teacher's embedding/norm) from an export.

    Without ``teacher``, the teacher is rebuilt from ``manifest["teacher"]``: a raptor teacher
    export is read with :meth:`Teacher.load`, anything else with ``Teacher.from_timm``.
    """
    student, man = load_student(url)
    if teacher is None:
        info = man.get("teacher") or {}
        ck = info.get("checkpoint") if isinstance(info, dict) else None
        if not isinstance(ck, str) or not ck:
            raise ckpt.CheckpointError(
                f"{url}: the manifest names no teacher checkpoint; pass teacher=... explicitly"
            )
        _, tmeta = ckpt.read_checkpoint(ck)
        if tmeta.get("format") == ckpt.TEACHER_FORMAT:
            teacher = Teacher.load(ck)
        else:
            teacher = Teacher.from_timm(
                info["name"], img_size=info["img_size"], checkpoint=ck, **info.get("model_kwargs", {})
            )
    student.attach(teacher)
    student.to(teacher.device)
    return student, teacher, man
