"""Stage-2 throughput: the Ray Train + DeepSpeed runner vs the bare single-process step.

Usage: .venv/bin/python scripts/bench_stage2.py RUN_DIR [STEPS]

RUN_DIR is a finished (or at least stage-1-complete) run, e.g. runs/quickstart. Both sides do the
same work per sample at the same per-worker batch: load + augment a batch, the teacher's
trajectory, the stage-2 loss, backward, clip, AdamW. The bare side is the core's
``raptor.distill.train_step`` in this process with one thread per worker's CPU
(``scaling.cpus_per_worker``); the runner is ``raptor.train.launch.run_stage`` with the spec's
workers, timed by its own progress rows after the first logging interval (start-up excluded).
Prints the bare rate and, for 1 worker and the spec's workers, the runner's rate per worker and
its ratio to the bare rate.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time

import ray
import torch
import yaml

from raptor import storage
from raptor.distill import lr_scheduler, make_optimizer, train_step
from raptor.models import load_student
from raptor.service.build import shard_source, stage_config, stage_job, teacher_ref
from raptor.service.layout import Layout
from raptor.service.spec import load_spec, parse_spec
from raptor.train.launch import run_stage


def bare(spec, layout: Layout, steps: int) -> float:
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    teacher = teacher_ref(spec, layout).load()
    student, _ = load_student(layout.student("stage1"), teacher)
    cfg = stage_config(spec, "stage2")
    opt = make_optimizer(student, cfg)
    sched = lr_scheduler(opt, cfg)
    loader = shard_source(spec, "train").loader(train=True, rank=0, world_size=spec.scaling.num_workers)
    batches = iter(loader)
    warm = max(2, steps // 10)
    for step in range(steps + warm):
        if step == warm:
            t0 = time.perf_counter()
        try:
            images, _ = next(batches)
        except StopIteration:
            loader.set_epoch(loader.epoch + 1)
            batches = iter(loader)
            images, _ = next(batches)
        train_step(student, teacher.trajectory(images), step, cfg, opt, sched)
    return steps * spec.data.batch_size / (time.perf_counter() - t0)


def runner(spec, layout: Layout, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        raw = yaml.safe_load(spec.to_yaml())
        raw["scaling"]["num_workers"] = workers
        raw["storage"]["checkpoint_interval"] = spec.stage2.steps  # one checkpoint, at the end
        raw["logging"].update(val_interval=spec.stage2.steps, wandb_mode="disabled")
        layout.folders["stage2"] = tmp
        run_stage(stage_job(parse_spec(raw), "stage2", layout, key="bench", inputs={}))
        rows = storage.read_json(f"{tmp}/history.json")
    steady = rows[1:-1] or rows  # the first interval holds start-up, the last the final validation
    return sum(r["samples_per_s"] for r in steady) / len(steady)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    run_dir = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    layout = Layout.from_index(run_dir)
    spec = load_spec(layout.spec_file, [f"stage2.steps={steps}", f"stage2.warmup_steps={steps // 10}",
                                        f"logging.log_interval={max(1, steps // 5)}"])
    b = bare(spec, layout, steps)
    ray.init(num_cpus=max(2, spec.scaling.num_workers), logging_level=logging.WARNING)
    print(f"stage 2, per-worker batch {spec.data.batch_size}: bare single-process step {b:.1f} samples/s")
    # 1 worker: the same machine share as the bare step (the Ray + DeepSpeed overhead alone); the
    # spec's workers: also sharing the cores between the workers and their loader processes
    for workers in sorted({1, spec.scaling.num_workers}):
        r = runner(spec, layout, workers)
        print(f"Ray Train + DeepSpeed ZeRO-{spec.deepspeed.zero_stage}, {workers} worker(s): {r:.1f} samples/s "
              f"= {r / workers:.1f} per worker ({r / workers / b:.0%} of bare)")


if __name__ == "__main__":
    main()
