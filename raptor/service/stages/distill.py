"""Stages 1 and 2: Ray Train + DeepSpeed jobs built from the spec (``raptor.service.spec.translate.stage_job``).

Stage 1 trains all k blocks at once, each on its segment (teacher forcing annealed into
autoregression); stage 2 chains the stage-1 blocks and rolls them out over all L layers.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from raptor.service.spec.translate import stage_job
from raptor.service.engine.graph import StageContext
from raptor.train.job import StageName

log = logging.getLogger(__name__)

# what a training stage's stage.json keeps of its final metrics (a sweep's results read them there)
SUMMARY = ("loss", "val/all/update_r2/mean", "val/all/update_r2/min", "val/top1", "val/teacher_top1")


def runner(stage: StageName) -> Callable[[StageContext], dict[str, Any]]:
    def run(ctx: StageContext) -> dict[str, Any]:
        from raptor.train.launch import run_stage  # Ray Train is loaded only when a stage trains

        job = stage_job(ctx.spec, stage, ctx.layout, ctx.step.key, ctx.step.inputs, report_interval=ctx.report_interval)
        metrics = run_stage(job)
        summary = {k: metrics[k] for k in SUMMARY if k in metrics}
        log.info("%s: loss %.4g, validation update-R^2 mean %.3f", stage, metrics.get("loss", float("nan")),
                 metrics.get("val/all/update_r2/mean", float("nan")))
        return summary

    return run
