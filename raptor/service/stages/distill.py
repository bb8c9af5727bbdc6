"""What the two distillation stages share: Ray Train + DeepSpeed jobs built from the spec
(``raptor.service.spec.translate.stage_job``), the fields they read, and how they resume.

Stage 1 (``stage1``) trains all k blocks at once, each on its segment (teacher forcing annealed into
autoregression); stage 2 (``stage2``) chains the stage-1 blocks and rolls them out over all L layers.
Each is a stage module of its own that declares itself with :func:`training_stage`. Both resume an
unfinished artifact from the Ray Train checkpoints under its folder.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from raptor.service.spec.translate import stage_job
from raptor.service.engine.graph import Stage, StageContext
from raptor.service.stages.fields import TRAIN_DATA
from raptor.train.job import StageName

log = logging.getLogger(__name__)

# what a training stage's stage.json keeps of its final metrics (a sweep's results read them there)
SUMMARY = ("loss", "val/all/update_r2/mean", "val/all/update_r2/min", "val/top1", "val/teacher_top1")

# what every stage that trains the student on the shards reads (beside its own section)
TRAINING = ("student", *TRAIN_DATA, "data.distill_transform", "data.batch_size", "data.num_workers",
            "teacher.precision", "scaling.num_workers", "scaling.use_gpu", "deepspeed")
TRAINING_IGNORES = {
    "deepspeed.zero_stage": "sharding reorders float sums only: ZeRO 0-3 agree to 1e-4 after training steps",
    "deepspeed.offload_optimizer": "where optimizer states live, not their values",
    "deepspeed.offload_param": "where parameters live, not their values",
    "deepspeed.activation_checkpointing": "recomputation gives the same activations",
    "deepspeed.compile": "inductor reorders and fuses float ops only: compiled and eager losses agree to 1e-4",
    "stage1.max_nonfinite_steps": "decides only whether a diverging stage stops; a finished stage is the same",
    "stage2.max_nonfinite_steps": "decides only whether a diverging stage stops; a finished stage is the same",
}
# version 3: one global sample order at any world size (raptor.data.streaming)
# version 2: deepspeed.precision bf16 means bf16 autocast in an fp32 engine with fp32 targets
# (version 1: DeepSpeed's bf16 mode, bf16 weights and trajectories)
TRAINING_VERSION = 3


def runner(stage: StageName) -> Callable[[StageContext], dict[str, Any]]:
    def run(ctx: StageContext) -> dict[str, Any]:
        from raptor.train.launch import run_stage  # Ray Train is loaded only when a stage trains

        job = stage_job(ctx.spec, stage, ctx.run_folder, ctx.step.key, ctx.step.inputs, report_interval=ctx.report_interval)
        metrics = run_stage(job)
        summary = {k: metrics[k] for k in SUMMARY if k in metrics}
        log.info("%s: loss %.4g, validation update-R^2 mean %.3f", stage, metrics.get("loss", float("nan")),
                 metrics.get("val/all/update_r2/mean", float("nan")))
        return summary

    return run


def training_reads(name: StageName) -> Callable[[Any], tuple[str, ...]]:
    """What stage ``name`` reads: its section and :data:`TRAINING`; with ``data.global_batch_size`` set,
    that instead of ``scaling.num_workers`` (a spec without it keeps the keys it had before the field).

    With a global batch the optimizer sees the same samples in every step at any worker count (one
    global order: :mod:`raptor.data.streaming`), under the same schedule. So a stage resized mid-way,
    or re-run on another number of workers, is the same artifact and resumes from its checkpoints
    (which load at any world size: :mod:`raptor.train.consolidated`).
    """
    def reads(spec: Any) -> tuple[str, ...]:
        if spec.data.global_batch_size is None:
            return (name, *TRAINING)
        return (name, *(f for f in TRAINING if f != "scaling.num_workers"), "data.global_batch_size")

    return reads


def training_stage(name: StageName, upstream: str) -> Stage:
    """The declaration of distillation stage ``name`` (its spec section is ``name``), consuming ``upstream``."""
    return Stage(name, reads=training_reads(name), upstream=(upstream,), run=runner(name),
                 ignores=TRAINING_IGNORES, version=TRAINING_VERSION, resumable=True)
