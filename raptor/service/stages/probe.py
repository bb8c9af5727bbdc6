"""The probe stage: linear classification probes on frozen teacher and student features.

One pass of the teacher over each split serves both backbones: the student rolls out from the
teacher's own a_0, and both final states go through the teacher's final norm and readout
([cls, mean patch]). The probes are :func:`raptor.eval.train_linear_probe` (DINOv2 protocol, a
learning-rate grid). Like is compared with like: the teacher's and the student's heads start from
the same (DINOv2) initialisation, and the student's share of the teacher's accuracy is theirs. The
paper's variant, the student's head fine-tuned from the teacher's trained probe head (METHOD.md
section 5, +0.6 points), is its own row, ``student_finetuned``.

``results.json`` records the fingerprint of every initial head (``head_init``: row -> lr ->
:func:`~raptor.eval.probe.head_fingerprint`), and the stage fails if the teacher's and the
student's differ: the share would then compare two different starts.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from raptor import data, storage
from raptor.errors import UserError
from raptor.eval import ProbeResult, extract_features, student_share, train_linear_probe
from raptor.models import Raptor, Teacher, load_student
from raptor.models.checkpoints import save_safetensors
from raptor.service.spec.translate import shard_source, single_device, single_process, teacher_ref
from raptor.service.engine.graph import Stage, StageContext
from raptor.service.spec import JobSpec
from raptor.service.stages.fields import EVAL_DATA
from raptor.train.settings import TeacherSettings

log = logging.getLogger(__name__)


def _features(
    teacher: Teacher, student: Raptor, batches: data.ShardLoader, device: torch.device, amp: torch.dtype | bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(teacher features, student features, labels): one teacher pass per batch serves both."""

    def both(images: torch.Tensor) -> torch.Tensor:
        traj = teacher.trajectory(images, amp=amp)
        last = student.rollout(traj[:, 0].float())[:, -1]
        return torch.cat([teacher.readout(traj[:, -1]).float(), teacher.readout(last).float()], dim=1)

    feats, labels = extract_features(both, batches, device=device)
    teacher_feats, student_feats = feats.chunk(2, dim=1)
    return teacher_feats, student_feats, labels


def _head_init(res: ProbeResult) -> dict[str, str]:
    """lr -> fingerprint of the head that lr's probe started from (JSON keys are strings)."""
    return {str(lr): fp for lr, fp in sorted(res.init_fingerprints.items())}


def probe(spec: JobSpec, teacher_ref: TeacherSettings, student_url: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Teacher, student and fine-tuned student linear probes (train split -> val split): the results,
    and the student rows' selected heads (``{row}.weight``, ``{row}.bias``: what an export of the student carries)."""
    if not spec.data.val:
        raise UserError("data.val: the probe stage needs a validation split")
    device = single_device(spec)
    teacher = teacher_ref.load(device)
    amp = teacher_ref.amp(device)
    student, _ = load_student(student_url, teacher)

    splits = {}
    for name in ("train", "val"):
        splits[name] = _features(teacher, student, shard_source(spec, name, num_workers=0).loader(train=False), device, amp)
    (train_t, train_s, train_y), (val_t, val_s, val_y) = splits["train"], splits["val"]
    p = spec.probe
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    kw = dict(num_classes=num_classes, lrs=p.lrs, epochs=p.epochs, batch_size=p.batch_size,
              weight_decay=p.weight_decay, warmup_steps=p.warmup_steps, seed=spec.data.seed)
    res_t = train_linear_probe(train_t, train_y, val_t, val_y, **kw)
    res_s = train_linear_probe(train_s, train_y, val_s, val_y, **kw)
    if res_t.init_fingerprints != res_s.init_fingerprints:  # a bug (the features' widths or the seeds differ), not bad input
        raise RuntimeError(f"the teacher's and the student's probe heads started from different weights "
                           f"({_head_init(res_t)} vs {_head_init(res_s)}): the student's share would not compare like with like")
    result: dict[str, Any] = {
        "teacher": res_t.to_dict(),
        "student": res_s.to_dict(),
        "student_share": student_share(res_s.top1, res_t.top1) if res_t.top1 > 0 else None,
        "head_init": {"teacher": _head_init(res_t), "student": _head_init(res_s)},
        "num_train": len(train_y),
        "num_val": len(val_y),
    }
    if p.init_from_teacher_head:
        res_f = train_linear_probe(train_s, train_y, val_s, val_y, init=(res_t.weight, res_t.bias), **kw)
        result["student_finetuned"] = {**res_f.to_dict(), "init": "the teacher's probe head"}
        result["head_init"]["student_finetuned"] = _head_init(res_f)
    rows = {"student": res_s, **({"student_finetuned": res_f} if p.init_from_teacher_head else {})}
    heads = {f"{row}.{part}": getattr(res, part).detach().cpu() for row, res in rows.items() for part in ("weight", "bias")}
    return result, heads


def run(ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec
    result, heads = single_process(spec, probe, spec, teacher_ref(spec, ctx.run_folder), ctx.run_folder.student("stage2"))
    storage.write_json(ctx.run_folder.probe, result)
    save_safetensors(ctx.run_folder.probe_heads, heads, {"rows": json.dumps(sorted({k.split(".")[0] for k in heads}))})
    log.info("probe: teacher top-1 %.3f, student top-1 %.3f (share %.1f%%)%s", result["teacher"]["top1"],
             result["student"]["top1"], 100 * (result["student_share"] or 0),
             f", fine-tuned from the teacher's head {result['student_finetuned']['top1']:.3f}" if "student_finetuned" in result else "")
    return {m: result[m]["top1"] for m in ("teacher", "student", "student_finetuned") if m in result}


STAGE = Stage("probe", reads=("probe", *EVAL_DATA, "data.seed", "teacher.precision", "scaling.use_gpu"),
              upstream=("stage2",), run=run, version=2)  # 2: the selected heads are saved (heads.safetensors)
