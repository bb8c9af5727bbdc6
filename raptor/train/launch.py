"""A distillation stage as a Ray Train V2 job: a TorchTrainer around :class:`~raptor.train.trainer.Trainer`.

Checkpoints live in the job's checkpoint folder (``{store}/{stage}/{key}/checkpoints``): re-running a
stage with the same key (after a crash, a Ctrl-C or a preempted cluster) resumes from its newest
checkpoint, and a stage with other inputs starts afresh in its own folder. Inside one run the worker
group restarts from the newest checkpoint after a crash (up to ``scaling.max_failures`` times) and
after a node was preempted (``scaling.max_preemptions``: Ray Train's own budget); an elastic group
restarts at the size the live nodes allow.
Object-store folders (``s3://...``) are handed to Ray as a pyarrow filesystem over the same fsspec
filesystem every other artifact uses, so the AWS variables (endpoint, credentials) mean the same
thing to checkpoints as to shards and exports, and with the same retries
(``raptor.train.objectstore``). A stage that stops on purpose comes back as one of raptor's own
errors (:func:`raptor_error`), not as Ray's wrapped traceback.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from raptor import storage
from raptor.errors import RunStopped, TrainingDiverged, UserError
from raptor.train import objectstore
from raptor.train.job import StageJob
from raptor.train.registered import CHECKPOINTS
from raptor.train.settings import worker_layout
from raptor.train.trainer import train_loop_per_worker

log = logging.getLogger(__name__)


def ray_storage(folder: str, patience_s: float) -> dict[str, Any]:
    """``storage_path`` (and ``storage_filesystem`` for object stores) of a Ray Train or Tune RunConfig;
    an object store is retried through outages for up to ``patience_s`` (:mod:`raptor.train.objectstore`)."""
    if storage.scheme(folder) == "file":
        return {"storage_path": os.path.abspath(folder)}
    fs, path = objectstore.filesystem(folder, patience_s)
    return {"storage_path": path, "storage_filesystem": fs}


def run_config(job: StageJob) -> ray.train.RunConfig:
    """RunConfig(name="checkpoints", storage_path=<the stage's key folder>): the same on every re-run, hence resume.

    A stage that reports while it trains (``labels.report_interval``: a sweep trial) forwards its
    reports to the Ray Tune trial it runs in, so Tune's scheduler sees them.
    """
    callbacks = []
    if job.labels.report_interval:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    return ray.train.RunConfig(
        name=CHECKPOINTS,
        failure_config=ray.train.FailureConfig(max_failures=job.scaling.max_failures,
                                               max_preemption_failures=job.scaling.max_preemptions),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.storage.keep),
        callbacks=callbacks,
        **ray_storage(job.out_url, job.storage.patience),
    )


def scaling_config(job: StageJob) -> ray.train.ScalingConfig:
    """The worker group: ``num_workers`` workers, or Ray Train's elastic range (min_workers, num_workers)."""
    s = job.scaling
    return ray.train.ScalingConfig(
        num_workers=s.num_workers if s.min_workers is None else (s.min_workers, s.num_workers),
        use_gpu=s.use_gpu,
        resources_per_worker=s.worker_resources(),
        placement_strategy=s.placement_strategy,
        elastic_resize_monitor_interval_s=s.resize_interval,
    )


def preflight(job: StageJob, world_size: int) -> None:
    """Fail in the driver, with the data layer's one-line message, on data the workers cannot split.

    Inside the workers the same error would be retried ``max_failures`` times as if a node had died.
    """
    for rank in range(world_size):
        job.train_loader(rank, world_size)


def stage_trainer(job: StageJob, loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
                  **config: Any) -> TorchTrainer:
    """The TorchTrainer that runs ``loop`` (the stage's Trainer unless told otherwise) for ``job`` with
    ``{"job": job, **config}``: gloo or NCCL, the job's scaling and its checkpoint folder."""
    return TorchTrainer(
        loop,
        train_loop_config={"job": job, **config},
        torch_config=TorchConfig(backend="nccl" if job.scaling.use_gpu else "gloo"),
        scaling_config=scaling_config(job),
        run_config=run_config(job),
    )


def run_stage(job: StageJob) -> dict[str, Any]:
    """Train ``job`` on the connected Ray cluster; the student is exported to ``job.out_url``.

    Returns the metrics rank 0 reported last. Raises :class:`~raptor.errors.TrainingDiverged` when
    the stage stopped on non-finite steps, :class:`~raptor.errors.StorageUnavailable` when object
    storage stayed unreachable past the patience, and ``ray.train.TrainingFailedError`` when the
    workers failed more than ``max_failures`` times for another reason.
    """
    sizes = job.scaling.world_sizes
    for n in {sizes[0], sizes[-1]}:
        preflight(job, n)
    trainer = stage_trainer(job)
    log.info("%s: %s, ZeRO-%d, %d steps", job.stage, worker_layout(sizes, job.batching, job.global_batch), job.deepspeed.zero_stage,
             job.config.steps)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        if (cause := raptor_error(e)) is not None:
            raise cause from None  # one line on the console, not Ray's wrapped remote traceback
        raise
    metrics = dict(result.metrics or {})
    if metrics.get("stopped"):
        raise TrainingDiverged(metrics["stopped"])
    return metrics


def raptor_error(error: BaseException) -> RunStopped | UserError | None:
    """The :class:`RunStopped` or :class:`UserError` a worker or the controller raised, inside Ray's wrappers."""
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (RunStopped, UserError)) and not isinstance(getattr(e, "cause", None), BaseException):
            return e  # the error itself, not Ray's wrapper of it (whose message holds the remote traceback)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__, getattr(e, "controller_failure", None),
                 *(getattr(e, "worker_failures", None) or {}).values()]
    return None
