"""Student files: one safetensors file whose metadata (``manifest``, JSON) rebuilds the architecture.

Two kinds, told apart by the manifest's ``student.stem``:

- **block-only** (version 1, what training stages write): the k blocks with their depth-scaling
  MLPs, the parameters the student trains. The teacher's embedding and final norm are not copied;
  ``manifest["teacher"]`` records how to rebuild the teacher (timm name, img_size, model_kwargs and
  the checkpoint URL), and :func:`rebuild_student` attaches it.
- **self-contained** (version 2, :class:`~raptor.models.vit.RaptorViT`, what ``raptor export``
  writes): the stem, blocks, final norm and heads. It loads from the file alone; the teacher fields
  are provenance only. A Hugging Face model folder (``config.json`` = the manifest,
  ``model.safetensors``, ``README.md``) holds the same file (:mod:`raptor.models.vit`).

Manifest: ``format: raptor-student``, ``version``, ``student: {boundaries, depth, k, block: {...},
layout: {...}[, stem, heads, head, data]}``, ``teacher: {...}`` and whatever the caller adds (run
keys, spec, metrics).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from timm.models import register_model

from raptor.models import checkpoints as ckpt
from raptor.models.student import Raptor, RaptorBlock
from raptor.models.teacher import Teacher, TokenGeometry
from raptor import storage
from raptor.models.vit import CONFIG, RaptorViT, is_folder, load_folder


def student_manifest(student: Raptor) -> dict[str, Any]:
    """The manifest that rebuilds ``student`` (with the teacher it is attached to, for a block-only one)."""
    man = ckpt.manifest_of(student.describe())
    t = student.teacher
    if t is not None:
        man["teacher"] = {"name": t.name, "img_size": t.img_size, "model_kwargs": t.model_kwargs, "checkpoint": t.checkpoint}
    return man


def save_student(student: Raptor, url: str, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the student's ``state_dict`` to ``url`` (safetensors); returns the manifest.

    ``manifest`` entries are merged on top of the architecture description (a caller may set
    ``manifest["teacher"]["checkpoint"]`` when the teacher object does not know its URL).
    """
    man = ckpt.merged(student_manifest(student), manifest)
    meta = {"format": ckpt.STUDENT_FORMAT, "manifest": json.dumps(man, sort_keys=True, default=str)}
    ckpt.save_safetensors(url, student.state_dict(), meta)
    return man


def load_student(url: str, teacher: Teacher | None = None) -> tuple[Raptor, dict[str, Any]]:
    """The student saved at ``url`` -> (student, manifest).

    ``url`` is a student file or a model folder. A self-contained file or folder gives a working
    :class:`RaptorViT` with no teacher; a block-only file gives the blocks, with ``teacher``
    attached if given (:func:`rebuild_student` finds the teacher itself).
    """
    if is_folder(url):
        student, man = load_folder(url)
    else:
        sd, meta = ckpt.read_checkpoint(url)
        if meta.get("format") != ckpt.STUDENT_FORMAT or "manifest" not in meta:
            raise ckpt.CheckpointError(f"{url} is not a raptor student export")
        man, s = ckpt.parse_student_manifest(meta["manifest"], url)
        student = load_weights(s, sd, url)
        if isinstance(student, RaptorViT):
            student.manifest = man
    if teacher is not None:
        try:
            student.attach(teacher)
        except ValueError as e:
            raise ckpt.CheckpointError(f"{url}: a student of another teacher ({e})") from None
        student.to(teacher.device)
    return student, man


def read_manifest(url: str) -> dict[str, Any]:
    """The manifest of the student at ``url`` (a file or a model folder), without reading its tensors."""
    if is_folder(url):
        config = storage.join(url, CONFIG)
        return ckpt.parse_student_manifest(storage.read_bytes(config).decode(errors="replace"), config)[0]
    meta = ckpt.read_metadata(url)
    if meta.get("format") != ckpt.STUDENT_FORMAT or "manifest" not in meta:
        raise ckpt.CheckpointError(f"{url} is not a raptor student export")
    return ckpt.parse_student_manifest(meta["manifest"], url)[0]


def load_weights(s: dict[str, Any], sd: dict[str, torch.Tensor], url: str) -> Raptor:
    """The student the manifest section ``s`` describes, with the tensors ``sd`` (checked first)."""
    student = ckpt.load_checked(lambda: _build(s, url), sd, url)
    student.config = dict(s["block"])
    return student


def _build(s: dict[str, Any], url: str) -> Raptor:
    """The (untrained) student the manifest's ``student`` section describes; values it cannot take are the file's fault."""
    if "stem" in s:
        return RaptorViT.from_description(s, url)
    try:
        geometry = TokenGeometry(**s["layout"])
        return Raptor([RaptorBlock(**s["block"]) for _ in range(s["k"])], s["boundaries"], geometry)
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"{url}: its manifest does not describe a student ({e})") from None


def rebuild_student(url: str, teacher: Teacher | None = None) -> tuple[Raptor, Teacher, dict[str, Any]]:
    """The full student (blocks + the teacher's embedding/norm) from a block-only export.

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


@register_model
def raptor_vit(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: dict[str, Any] | None = None,
               num_classes: int | None = None, img_size: int | None = None, **kwargs: Any) -> RaptorViT:
    """timm's entry point for a self-contained export (a file or a model folder), registered when
    ``raptor.models`` is imported::

        timm.create_model("raptor_vit", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))

    ``num_classes`` gives a new head (0: none), ``img_size`` bakes the position embeddings for that size.
    """
    file = (pretrained_cfg_overlay or {}).get("file")
    if not pretrained or not file:
        raise ValueError("raptor_vit is built from an export: timm.create_model('raptor_vit', pretrained=True, "
                         "pretrained_cfg_overlay=dict(file=PATH))")
    unknown = sorted(k for k in kwargs if k not in ("cache_dir", "pretrained_strict"))
    if unknown:
        raise ValueError(f"raptor_vit takes num_classes and img_size, not {', '.join(unknown)}")
    model, _ = load_student(file)
    if not isinstance(model, RaptorViT):
        raise ckpt.CheckpointError(f"{file}: a block-only student (a training stage's); `raptor export` makes a self-contained one")
    if img_size is not None and img_size != model.geometry.img_size:
        model = model.at_resolution(img_size)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    model.pretrained_cfg = {**model.pretrained_cfg, "file": file, "architecture": "raptor_vit"}
    return model
