"""What Ray Train + DeepSpeed cost: a stage's step through the runner against the bare step (the runner
should add at most a tenth), and what a checkpoint adds to a step, uploaded sync or async.

Both sides run the same :class:`~raptor.train.job.StageJob` with the same work per sample: this
rank's shards through the loader, the teacher's trajectory and the stage loss through the job's
:class:`~raptor.train.hotpath.HotPath` (precision, compile mode, checkpointing), backward,
clipping, AdamW (fused on GPU) and the LR schedule. The bare side runs them in this process with
a plain torch optimizer; the runner side is :func:`raptor.train.launch.run_stage` (a TorchTrainer
with one DeepSpeed engine per worker), timed by its own progress rows after the first logging
interval (start-up and compilation excluded) and before the last (the final validation and
checkpoint). ``scripts/bench_runner.py`` (on CPU; ``--checkpoint-every`` for checkpoints to an S3
server) and ``scripts/bench_gpu.py`` (the device check) call this module.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from typing import Any

import torch

from raptor import storage
from raptor.distill import lr_scheduler, make_optimizer
from raptor.train.export import HISTORY_FILE
from raptor.train.hotpath import HotPath
from raptor.train.job import StageJob
from raptor.train.trainer import batches_from, build_student


def bare_rate(job: StageJob, steps: int, warmup: int = 3, device: torch.device | None = None) -> float:
    """Samples/s of ``job``'s step in this process, without Ray or DeepSpeed (rank 0's shards)."""
    device = device or torch.device("cuda" if job.scaling.use_gpu else "cpu")
    ds, cfg = job.deepspeed, job.config
    teacher = job.teacher.load(device)
    student = build_student(job, teacher)
    hot = HotPath.for_job(job, teacher, student, device)
    optimizer = make_optimizer(student, cfg, fused=ds.fused_adamw(device))
    scheduler = lr_scheduler(optimizer, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    world = job.scaling.num_workers
    micro, accum = job.batching(world)
    batches = batches_from(job.train_loader(0, world, device), 0)

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(accum):
            loss, _ = hot.objective(hot.trajectory(next(batches).to(device)), i)
            (loss / accum).backward()
        if ds.gradient_clipping:
            torch.nn.utils.clip_grad_norm_(params, ds.gradient_clipping)
        optimizer.step()
        scheduler.step()

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * micro * accum / (time.perf_counter() - t0)


def _history(job: StageJob, steps: int, workers: int, out_url: str, log_interval: int, **storage_settings: Any) -> list[dict]:
    """The logged rows of ``job`` run for ``steps`` steps through Ray Train + DeepSpeed into ``out_url``
    (validation only at the end); needs a Ray cluster (``ray.init``) with room for the workers."""
    from raptor.train.launch import run_stage  # Ray Train is loaded only when the runner is measured

    measured = dataclasses.replace(
        job,
        config=dataclasses.replace(job.config, steps=steps),
        scaling=job.scaling.updated(num_workers=workers, min_workers=None, max_failures=0),
        storage=job.storage.updated(**storage_settings),
        logging=job.logging.updated(log_interval=log_interval, val_interval=steps, wandb_mode="disabled"),
        out_url=out_url,
    )
    run_stage(measured)
    return storage.read_json(storage.join(out_url, HISTORY_FILE))


def runner_rate(job: StageJob, steps: int, workers: int = 1) -> float:
    """Samples/s of ``job`` through Ray Train + DeepSpeed with ``workers`` workers (all together)."""
    with tempfile.TemporaryDirectory(prefix="raptor-bench-") as tmp:
        rows = _history(job, steps, workers, tmp, max(1, steps // 5), checkpoint_interval=steps)  # one, at the end
    steady = rows[1:-1] or rows  # the first interval holds start-up, the last the final validation
    return sum(r["samples_per_s"] for r in steady) / len(steady)


def checkpoint_cost(job: StageJob, steps: int, interval: int, store: str, workers: int = 1) -> list[dict[str, Any]]:
    """Step times of ``job`` checkpointing every ``interval`` steps into ``store`` (e.g. ``s3://bucket/x``),
    the upload sync and async: per mode, the median step without a checkpoint, the median step that
    took one (a step's time runs from its predecessor's log row to its own, so it holds the
    checkpoint its predecessor took) and the mean of all steps after the first interval."""
    rows = []
    for upload in ("sync", "async"):
        out = storage.join(store, f"{job.stage}-{upload}-{time.time_ns()}")
        history = _history(job, steps, workers, out, 1, checkpoint_interval=interval, upload=upload, keep=2)
        times = {b["step"]: (b["samples"] - a["samples"]) / b["samples_per_s"] for a, b in zip(history, history[1:])}
        after = [t for step, t in times.items() if (step - 1) % interval == 0 and step > interval]
        plain = [t for step, t in times.items() if (step - 1) % interval and step > interval]
        folder = storage.join(out, "checkpoints")
        fs, root = storage.filesystem(folder)
        saved = [rel for rel in storage.files(folder) if rel.startswith("checkpoint_step")]
        newest = max(rel.split("/")[0] for rel in saved)
        size = sum(fs.size(f"{root.rstrip('/')}/{rel}") for rel in saved if rel.startswith(newest + "/"))
        rows.append({"upload": upload, "workers": workers, "steps": steps, "interval": interval,
                     "checkpoint_mb": round(size / 2**20, 1),
                     "step_ms": round(1000 * statistics.median(plain), 1),
                     "checkpoint_step_ms": round(1000 * statistics.median(after), 1),
                     "mean_step_ms": round(1000 * statistics.fmean([t for s, t in times.items() if s > interval]), 1)})
        storage.remove(out)
    return rows


def compare(job: StageJob, steps: int, warmup: int = 3, workers: tuple[int, ...] = (1,)) -> list[dict[str, Any]]:
    """The bare rate and, per worker count, the runner's rate per worker and its ratio to the bare rate."""
    device = torch.device("cuda" if job.scaling.use_gpu else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu":  # the bare step gets one worker's share of the cores, as Ray gives a worker
        torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))
    try:
        bare = bare_rate(job, steps, warmup)
    finally:
        torch.set_num_threads(threads)
    rows = []
    for w in workers:
        total = runner_rate(job, steps, w)
        rows.append({"stage": job.stage, "batch": job.train.settings.batch_size, "device": device.type,
                     "compile": job.deepspeed.compile_mode(device), "zero_stage": job.deepspeed.zero_stage,
                     "workers": w, "bare_samples_per_s": round(bare, 1), "runner_samples_per_s": round(total, 1),
                     "runner_per_worker": round(total / w, 1), "ratio": round(total / w / bare, 3)})
    return rows
