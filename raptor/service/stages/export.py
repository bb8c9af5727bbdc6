"""The export stage: the run's student as a self-contained model, in the formats the spec's ``export`` names.

:func:`export_run` builds a :class:`~raptor.models.RaptorViT` from the run's artifacts: stage 2's
blocks, the teacher's stem and final norm, the teacher's classifier (when it has one) and the probe
stage's heads on the student's features (``probe``, ``probe_finetuned``), and writes it with
:func:`raptor.export.write_exports` (a safetensors file, a Hugging Face folder with its model card,
ONNX). The manifest carries the provenance: the teacher (name, checkpoint URL, license, parameters,
FLOPs), the run's artifacts, its spec, and the report's fidelity and probe numbers. The folder is
copied into the run folder (``model/``). ``raptor export RUN_URL`` runs the same on a finished run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from raptor import storage
from raptor.errors import CorruptArtifact, MissingInput, UserError
from raptor.export import FOLDER
from raptor.export.write import write_exports
from raptor.models import RaptorViT, load_student
from raptor.models.checkpoints import read_checkpoint
from raptor.perf.flops import TeacherShape
from raptor.service.engine.artifacts import RunFolder
from raptor.service.engine.graph import Stage, StageContext
from raptor.service.spec import JobSpec
from raptor.service.spec.translate import teacher_ref

log = logging.getLogger(__name__)

PUBLISHED = "model"  # the run folder's copy of the export
PROBE_HEADS = {"student_finetuned": "probe_finetuned", "student": "probe"}  # the probe stage's rows -> the heads' names


def student_flops(model: RaptorViT, size: int) -> int:
    """Matrix-product FLOPs of one image through the stem and the L block applications
    (``torch.utils.flop_counter``'s count on a copy of the model on the meta device: no memory, no arithmetic)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        copy = RaptorViT.from_description(model.describe(), "the export")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        copy.final_state(copy.embed(torch.zeros(1, 3, size, size, device="meta")))
    return int(counter.get_total_flops())


def _license(spec: JobSpec) -> str:
    """The spec's, else the teacher's: timm's pretrained config for a given checkpoint of a known architecture."""
    if spec.export.license:
        return spec.export.license
    if spec.teacher.checkpoint is not None:
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.teacher.name)
        if cfg is not None and cfg.license:
            return cfg.license
    return "other"


def _heads(run_folder: RunFolder) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """The probe stage's student heads (name -> weight, bias) and their val top-1; none without a probe stage."""
    if "probe" not in run_folder.folders:
        return {}, {}
    results = storage.read_json(run_folder.probe)
    if not storage.exists(run_folder.probe_heads):
        raise MissingInput(f"{run_folder.probe_heads}: missing (a probe stage made before heads were saved); "
                           "`raptor run` with --set probe.epochs=... or a fresh store makes it again")
    tensors, _ = read_checkpoint(run_folder.probe_heads)
    heads, top1 = {}, {}
    for row, name in PROBE_HEADS.items():
        if f"{row}.weight" in tensors and isinstance(results.get(row), dict):
            heads[name] = (tensors[f"{row}.weight"], tensors[f"{row}.bias"])
            top1[name] = float(results[row]["top1"])
    return heads, top1


def _report(run_folder: RunFolder) -> dict[str, Any]:
    """The report's numbers the model card shows: per-layer fidelity, probe top-1, samples."""
    if "report" not in run_folder.folders:
        return {}
    report = storage.read_json(storage.join(run_folder.folder("report"), "report.json"))
    try:
        fid = report.get("fidelity") or {}
        out: dict[str, Any] = {"num_samples": report["dynamics"]["teacher"]["num_samples"]}
        if fid:
            out["fidelity"] = {k: fid[k] for k in ("layers", "update_r2", "r2", "cosine")}
        if report.get("probe"):
            out["probe"] = report["probe"]
    except (AttributeError, KeyError, TypeError) as e:
        raise CorruptArtifact(f"{run_folder.folder('report')}/report.json: not a raptor report ({e})") from None
    return out


def build_model(spec: JobSpec, run_folder: RunFolder) -> tuple[RaptorViT, dict[str, Any]]:
    """The self-contained student of the run (fp32, CPU) and the manifest's provenance sections."""
    ref = teacher_ref(spec, run_folder)
    teacher = ref.updated(precision="fp32").load(torch.device("cpu"))
    student, _ = load_student(run_folder.student("stage2"), teacher)
    heads, top1 = _heads(run_folder)
    head = spec.export.head
    if head is None:
        head = max(top1, key=lambda n: (top1[n], n == "probe_finetuned")) if top1 else None
    elif head != "teacher" and head not in heads:
        raise UserError(f"export.head: {head!r} does not exist in this run (heads: {sorted(heads) + (['teacher'] if teacher.head else [])})")
    elif head == "teacher" and teacher.head is None:
        raise UserError("export.head: the teacher has no classifier head")
    model = RaptorViT.from_student(student, teacher, heads=heads, head_name=head)
    size = teacher.img_size
    extra = {
        "teacher": {"name": teacher.name, "img_size": size, "model_kwargs": teacher.model_kwargs,
                    "checkpoint": ref.checkpoint, "license": _license(spec),
                    "params": sum(p.numel() for p in teacher.parameters()),
                    "flops_per_image": TeacherShape.from_teacher(teacher).forward_flops()},  # the stem and L blocks
        "stats": {"params": sum(p.numel() for p in model.parameters()), "flops_per_image": student_flops(model, size)},
        "run": {"name": spec.name, "url": run_folder.run_url, "artifacts": dict(run_folder.folders)},  # the run that made it
        "spec": spec.public_dump(),  # credentials redacted: the folder is made to be shared
        "report": _report(run_folder),
    }
    return model, extra


def export_run(spec: JobSpec, run_folder: RunFolder, out_url: str, formats: list[str] | None = None,
               resolution: int | None = None) -> dict[str, str]:
    """Write the run's student to ``out_url`` in ``formats`` (default: the spec's) -> format -> URL."""
    model, extra = build_model(spec, run_folder)
    return write_exports(model, out_url, formats or spec.export.formats, extra=extra,
                         resolution=resolution or spec.export.resolution)


def check(spec: JobSpec) -> None:
    e = spec.export
    if "onnx" in e.formats:
        from raptor.export.onnx import require_onnx

        require_onnx()
    if e.resolution is not None:
        patch = TeacherShape.from_timm(spec.teacher.name, spec.teacher.img_size, **spec.teacher.model_kwargs).patch_size
        if e.resolution % patch:
            raise UserError(f"export.resolution: {e.resolution} is not a multiple of the teacher's patch size {patch}")


def run(ctx: StageContext) -> dict[str, Any]:
    written = export_run(ctx.spec, ctx.run_folder, ctx.folder)
    log.info("export: %s (copied to %s)", ", ".join(sorted(written)), ctx.run_folder.run(PUBLISHED))
    return {"formats": sorted(written), "folder": FOLDER if "hf" in written else None}


STAGE = Stage("export", reads=("export",), upstream=("teacher", "stage2", "probe", "report"), run=run,
              publish=PUBLISHED, check=check)
