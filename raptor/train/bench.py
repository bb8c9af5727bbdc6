"""What Ray Train + DeepSpeed cost: a stage's step through the runner against the bare step (the runner
should add at most a tenth), what a checkpoint adds to a step, uploaded sync or async, and what a
resize costs (a stage resumed from its checkpoint at another world size, against a fresh start).

Both sides run the same :class:`~raptor.train.job.StageJob` with the same work per sample: this
rank's shards through the loader, the teacher's trajectory and the stage loss through the job's
:class:`~raptor.train.hotpath.HotPath` (precision, compile mode, checkpointing), backward,
clipping, AdamW (fused on GPU) and the LR schedule. The bare side runs them in this process with
a plain torch optimizer; the runner side is :func:`raptor.train.launch.run_stage` (a TorchTrainer
with one DeepSpeed engine per worker), timed by its own progress rows after the first logging
interval (start-up and compilation excluded) and before the last (the final validation and
checkpoint). ``scripts/bench_runner.py`` (on CPU; ``--checkpoint-every`` for checkpoints to an S3
server, ``--resize`` for a resize) and ``scripts/bench_gpu.py`` (the device check) call this module.
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
from raptor.train.export import HISTORY_FILE, MANIFEST_FILE
from raptor.train.hotpath import HotPath
from raptor.train.job import StageJob
from raptor.train.registered import CHECKPOINT_DIR, CHECKPOINTS
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


def _measured(job: StageJob, steps: int, workers: int, out_url: str, log_interval: int, **storage_settings: Any) -> StageJob:
    """``job`` for ``steps`` steps on ``workers`` workers into ``out_url``, validated only at the end, no retries."""
    return dataclasses.replace(
        job,
        config=dataclasses.replace(job.config, steps=steps),
        scaling=job.scaling.updated(num_workers=workers, min_workers=None, max_failures=0),
        storage=job.storage.updated(**storage_settings),
        logging=job.logging.updated(log_interval=log_interval, val_interval=steps, wandb_mode="disabled"),
        out_url=out_url,
    )


def _history(job: StageJob, steps: int, workers: int, out_url: str, log_interval: int, **storage_settings: Any) -> list[dict]:
    """The logged rows of ``job`` run for ``steps`` steps through Ray Train + DeepSpeed into ``out_url``
    (validation only at the end); needs a Ray cluster (``ray.init``) with room for the workers."""
    from raptor.train.launch import run_stage  # Ray Train is loaded only when the runner is measured

    run_stage(_measured(job, steps, workers, out_url, log_interval, **storage_settings))
    return storage.read_json(storage.join(out_url, HISTORY_FILE))


def _step_times(history: list[dict]) -> dict[int, float]:
    """Seconds per logged step, from the samples counted and the rate of each row (log interval 1)."""
    return {b["step"]: (b["samples"] - a["samples"]) / b["samples_per_s"] for a, b in zip(history, history[1:])}


def _checkpoint_mb(checkpoints: str, step: int | None = None) -> float:
    """MiB of the checkpoint of ``step`` (default: the newest) in a stage's ``checkpoints`` folder."""
    fs, root = storage.filesystem(checkpoints)
    sizes: dict[int, int] = {}
    for rel in storage.files(checkpoints):
        if m := CHECKPOINT_DIR.match(rel.split("/")[0]):
            sizes[int(m.group(1))] = sizes.get(int(m.group(1)), 0) + fs.size(f"{root.rstrip('/')}/{rel}")
    return round(sizes[max(sizes) if step is None else step] / 2**20, 1)


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
        times = _step_times(history)
        after = [t for step, t in times.items() if (step - 1) % interval == 0 and step > interval]
        plain = [t for step, t in times.items() if (step - 1) % interval and step > interval]
        rows.append({"upload": upload, "workers": workers, "steps": steps, "interval": interval,
                     "checkpoint_mb": _checkpoint_mb(storage.join(out, CHECKPOINTS)),
                     "step_ms": round(1000 * statistics.median(plain), 1),
                     "checkpoint_step_ms": round(1000 * statistics.median(after), 1),
                     "mean_step_ms": round(1000 * statistics.fmean([t for s, t in times.items() if s > interval]), 1)})
        storage.remove(out)
    return rows


class Stopped(Exception):
    """Raised by :func:`stop_after` when its stage reaches the step it was told to stop at."""


def stop_after(config: dict[str, Any]) -> None:
    """Ray Train worker: ``config["job"]``'s Trainer, stopped (raising :class:`Stopped`) when ``config["stop"]``
    steps are done, after that step's checkpoint if one was due: a stage interrupted there, to be resumed."""
    from raptor.train.logs import quiet_worker
    from raptor.train.trainer import Trainer

    class Stopping(Trainer):
        def step(self, batches, step):
            if step == config["stop"]:
                raise Stopped(f"stopped at step {step}")
            return super().step(batches, step)

    quiet_worker()
    Stopping(config["job"]).train()


def stop_stage(job: StageJob, stop: int) -> None:
    """Run ``job`` through Ray Train until step ``stop`` is done (and checkpointed, if one was due) and stop it
    there as a crash would; raises if the stage ended any other way."""
    import ray.train

    from raptor.train.launch import stage_trainer

    try:
        stage_trainer(job, stop_after, stop=stop).fit()
    except ray.train.TrainingFailedError as e:
        if f"stopped at step {stop}" in str(e):
            return
        raise
    raise RuntimeError(f"{job.stage} ran through instead of stopping at step {stop}")


def resize_cost(job: StageJob, steps: int, stop: int, before: int, after: int, store: str) -> dict[str, Any]:
    """What a resize costs: ``job`` stopped after its step-``stop`` checkpoint on ``before`` workers and resumed
    from it on ``after`` (Ray Train's restart of the group, at another size), against the same stage started
    afresh on ``after``. A run's start-up is its wall time less its steps at its median step time: for the
    fresh one Ray Train's controller and worker group, DeepSpeed, the teacher and the loader; the resumed
    one adds the checkpoint's download, load and re-partitioning and the loader's skip to ``stop``. An
    elastic resize keeps the controller, so it costs at most ``resume_s``."""
    from raptor.train.launch import run_stage

    def timed(run: StageJob) -> tuple[float, float]:
        t0 = time.perf_counter()
        run_stage(run)
        wall = time.perf_counter() - t0
        times = _step_times(storage.read_json(storage.join(run.out_url, HISTORY_FILE)))
        return wall, statistics.median(t for s, t in times.items() if s > stop + 1)

    base = storage.join(store, f"resize-{before}-{after}-{time.time_ns()}")
    settings = {"checkpoint_interval": stop, "upload": "sync"}
    fresh = _measured(job, steps, after, storage.join(base, "fresh"), 1, **settings)
    stopped = _measured(job, steps, before, storage.join(base, "stopped"), 1, **settings)
    stop_stage(stopped, stop)
    saved = storage.join(stopped.out_url, CHECKPOINTS)
    resumed = dataclasses.replace(fresh, out_url=storage.join(base, "resumed"))
    storage.copy_tree(saved, storage.join(resumed.out_url, CHECKPOINTS))
    fresh_wall, fresh_step = timed(fresh)
    resumed_wall, resumed_step = timed(resumed)
    resumed_at = storage.read_json(storage.join(resumed.out_url, MANIFEST_FILE))["resumed_at"]
    if resumed_at != [stop]:
        raise RuntimeError(f"the resumed run resumed at {resumed_at}, not at step {stop}")
    size_mb = _checkpoint_mb(saved, stop)
    storage.remove(base)
    return {"before": before, "after": after, "steps": steps, "stop": stop, "checkpoint_mb": size_mb,
            "step_ms": round(1000 * resumed_step, 1), "fresh_wall_s": round(fresh_wall, 1),
            "start_s": round(fresh_wall - steps * fresh_step, 1), "resumed_wall_s": round(resumed_wall, 1),
            "resume_s": round(resumed_wall - (steps - stop) * resumed_step, 1)}


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
