"""The probe stage: linear classification probes on frozen teacher and student features.

One pass of the teacher over each split serves both backbones: the student rolls out from the
teacher's own a_0, and both final states go through the teacher's final norm and readout
([cls, mean patch]). The probes are :func:`raptor.eval.train_linear_probe` (DINOv2 protocol, a
learning-rate grid); the student's heads start from the teacher's trained head when it has one,
the paper's fine-tuned probe. The per-layer fidelity and the rest of the report come from
:mod:`raptor.analysis` in the report stage.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from raptor import data, storage
from raptor.config import JobSpec
from raptor.eval import extract_features, student_share, train_linear_probe
from raptor.models import Raptor, Teacher, load_student
from raptor.build import load_teacher, spec_loader
from raptor.train.stage import single_device

log = logging.getLogger(__name__)


def _features(
    teacher: Teacher, student: Raptor, batches: data.ShardLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(teacher features, student features, labels): one teacher pass per batch serves both."""
    amp = device.type == "cuda"

    def both(images: torch.Tensor) -> torch.Tensor:
        traj = teacher.trajectory(images, amp=amp)
        last = student.rollout(traj[:, 0])[:, -1]
        return torch.cat([teacher.readout(traj[:, -1]).float(), teacher.readout(last).float()], dim=1)

    feats, labels = extract_features(both, batches, device=device)
    teacher_feats, student_feats = feats.chunk(2, dim=1)
    return teacher_feats, student_feats, labels


def probe(spec: JobSpec, teacher_url: str, student_url: str, out: str) -> dict[str, Any]:
    """Teacher and student linear probes (train split -> val split); writes ``out/results.json``."""
    if not spec.data.val:
        raise ValueError("data.val: the probe stage needs a validation split")
    device = single_device(spec)
    teacher = load_teacher(spec, teacher_url).to(device)
    student, _ = load_student(student_url, teacher)

    train_t, train_s, train_y = _features(teacher, student, spec_loader(spec, spec.data.train, train=False), device)
    val_t, val_s, val_y = _features(teacher, student, spec_loader(spec, spec.data.val, train=False), device)
    p = spec.probe
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    head = teacher.head if p.init_from_teacher_head else None
    init = None
    if head is not None and head.out_features == num_classes:
        init = (head.weight.detach().cpu(), head.bias.detach().cpu())
    kw = dict(num_classes=num_classes, lrs=p.lrs, epochs=p.epochs, batch_size=p.batch_size,
              weight_decay=p.weight_decay, warmup_steps=p.warmup_steps, seed=spec.data.seed)
    res_t = train_linear_probe(train_t, train_y, val_t, val_y, **kw)
    res_s = train_linear_probe(train_s, train_y, val_s, val_y, init=init, **kw)
    result = {
        "teacher": res_t.to_dict(),
        "student": res_s.to_dict(),
        "student_share": student_share(res_s.top1, res_t.top1) if res_t.top1 > 0 else None,
        "student_head_init": "teacher head" if init is not None else "dinov2 default",
        "num_train": len(train_y),
        "num_val": len(val_y),
    }
    storage.write_json(storage.join(out, "results.json"), result)
    return result
