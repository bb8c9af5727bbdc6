"""The teacher stage: supervised training of a timm ViT on the shards, or the checkpoint the spec gives.

The embedded default has no pretrained DINOv2 to download, so its teacher is trained here first:
any timm ViT by name (``model_kwargs`` shrink it to a laptop-sized DINOv2 architecture), timm's
drop-path rate (higher rates make layers more alike and the teacher easier to distil, METHOD.md
section 7), AdamW with warm-up + cosine and label smoothing. The result is a raptor teacher export
whose linear head is the trained classifier, so the probe stage can start the student's head from
it. One process (on the GPU when there is one): a teacher for a large run comes as a checkpoint,
and then this stage only checks that the checkpoint is there (``given``), used where it is and
identified by its content. ``raptor teacher train`` (``raptor.service.cli``) runs :func:`train_teacher`
outside the pipeline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import timm
import torch
import torch.nn.functional as F

from raptor import storage
from raptor.distill import lr_factor
from raptor.errors import UserError
from raptor.eval import collect, topk_accuracy
from raptor.models import Teacher
from raptor.models.teacher import autocast
from raptor.service.spec.translate import check_teacher, shard_source, single_device, single_process
from raptor.service.engine.graph import Stage, StageContext
from raptor.service.spec import JobSpec, TeacherTrainSpec
from raptor.service.stages.fields import EVAL_DATA, TRAIN_DATA
from raptor.execution import autocast_dtype

log = logging.getLogger(__name__)


def train_teacher(spec: JobSpec, out_url: str, device: torch.device | None = None) -> dict[str, Any]:
    """Train ``spec.teacher`` on ``spec.data`` and export it to ``out_url``; returns its metrics."""
    tspec = spec.teacher
    tt: TeacherTrainSpec | None = tspec.train
    if tt is None:
        raise UserError("teacher.train: missing (the spec gives no recipe to train the teacher with)")
    device = device or single_device(spec)
    amp = autocast_dtype(tspec.precision, device)  # teacher.precision: the same rule as every stage's teacher
    seed = spec.data.seed if tt.seed is None else tt.seed
    torch.manual_seed(seed)
    source = shard_source(spec, "train", num_workers=tt.num_workers, seed=seed)  # its own batch: its own read streams
    train = replace(source, settings=source.settings.updated(streams=None)).loader(
        train=True, batch_size=tt.batch_size, device=device)
    if not train.num_classes:
        raise UserError(f"data.train: {spec.data.train} has no class count (_info.json) to size the classifier")
    model = timm.create_model(tspec.name, img_size=tspec.img_size, num_classes=train.num_classes,
                              drop_path_rate=tspec.drop_path_rate, **tspec.model_kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tt.lr, weight_decay=tt.weight_decay)
    total = tt.epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, tt.warmup_steps))
    log.info("training teacher %s %s (drop_path %.2f, seed %d) for %d epochs x %d steps on %s",
             tspec.name, tspec.model_kwargs, tspec.drop_path_rate, seed, tt.epochs, len(train), device)
    t0, step = time.perf_counter(), 0
    for epoch in range(tt.epochs):
        model.train()
        train.set_epoch(epoch)
        for images, labels in train:
            with autocast(device, amp):
                logits = model(images.to(device))
            loss = F.cross_entropy(logits.float(), labels.to(device), label_smoothing=tt.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
        log.info("teacher epoch %d/%d loss %.3f (%.0f samples/s)", epoch + 1, tt.epochs, loss.item(),
                 step * tt.batch_size / (time.perf_counter() - t0))
    metrics: dict[str, Any] = {"train_loss": loss.item(), "steps": step, "seconds": time.perf_counter() - t0}
    if spec.data.val:
        val = shard_source(spec, "val", num_workers=0).loader(train=False, batch_size=tt.batch_size)
        model.eval()
        with autocast(device, amp):
            logits, labels = collect(model, val, device=device)
        metrics["val_top1"] = topk_accuracy(logits, labels, ks=(1,))["top1"]
        log.info("teacher val top-1 %.3f", metrics["val_top1"])
    teacher = Teacher.from_model(model.cpu(), name=tspec.name, img_size=tspec.img_size, model_kwargs=tspec.model_kwargs)
    teacher.save(out_url, metadata={"trained": metrics, "drop_path_rate": tspec.drop_path_rate, "seed": seed})
    return metrics


def run(ctx: StageContext) -> dict[str, Any]:
    """Train the spec's teacher into this key's folder: ``teacher.safetensors``, then ``metrics.json``."""
    metrics = single_process(ctx.spec, train_teacher, ctx.spec, ctx.run_folder.teacher)
    storage.write_json(ctx.run_folder.teacher_metrics, metrics)
    return {"val_top1": metrics.get("val_top1")}


def reads(spec: JobSpec) -> tuple[str, ...]:
    if spec.teacher.checkpoint is not None:  # given: the file and how to build the model around it
        return ("teacher.checkpoint", "teacher.name", "teacher.img_size", "teacher.model_kwargs")
    # data.seed seeds the teacher only while teacher.train.seed leaves it open (then a sweep over data.seed keeps one teacher)
    seed = ("data.seed",) if spec.teacher.train is not None and spec.teacher.train.seed is None else ()
    return ("teacher", *(f for f in TRAIN_DATA if f not in ("data.seed", "data.streams")), *EVAL_DATA, "data.generate", *seed,
            "scaling.use_gpu")


def content(spec: JobSpec) -> dict[str, str]:
    """A given teacher checkpoint (official .pth, timm/HF safetensors or a raptor export) by content."""
    assert spec.teacher.checkpoint is not None
    return {"teacher.checkpoint (content)": storage.identity([spec.teacher.checkpoint])}


def missing(spec: JobSpec, url: str) -> str | None:
    return None if storage.exists(url) else f"teacher.checkpoint: no such file {url}"


STAGE = Stage(
    "teacher", reads=reads, upstream=("data",), run=run,
    given=lambda spec: spec.teacher.checkpoint is not None, content=content,
    location=lambda spec: spec.teacher.checkpoint, missing=missing, check=check_teacher,
)
