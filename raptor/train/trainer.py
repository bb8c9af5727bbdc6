"""A distillation stage as a Ray Train V2 job: TorchTrainer + ScalingConfig/RunConfig from the spec.

Checkpoints live under ``{storage.url}/checkpoints/{stage}``: Ray Train's run name is the stage
and its storage path the run's artifact root, so re-running a stage of the same spec (after a
crash, a Ctrl-C or a preempted cluster) resumes from its newest checkpoint. Worker crashes inside
one run are retried up to ``scaling.max_failures`` times from the newest checkpoint
(``FailureConfig``). Object-store roots (``s3://...``) are handed to Ray as a pyarrow filesystem
over the same fsspec filesystem every other artifact uses, so the AWS variables (endpoint,
credentials) mean the same thing to checkpoints as to shards and exports.
"""

from __future__ import annotations

import logging
from typing import Any

import ray.train
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.train.torch import TorchConfig, TorchTrainer

from raptor import storage
from raptor.config import JobSpec
from raptor.build import spec_loader
from raptor.train.stage import StageName, absolute, absolute_paths
from raptor.train.worker import train_loop_per_worker

log = logging.getLogger(__name__)


def checkpoint_root(spec: JobSpec) -> str:
    return storage.join(spec.storage.url, "checkpoints")


def run_config(spec: JobSpec, stage: StageName) -> ray.train.RunConfig:
    """RunConfig(name=stage, storage_path=<run>/checkpoints): the same on every re-run, hence resume."""
    root = checkpoint_root(spec)
    fs_args: dict[str, Any] = {}
    if storage.scheme(root) == "file":
        path = absolute(root)
    else:
        fs, path = storage.filesystem(root)
        fs_args["storage_filesystem"] = PyFileSystem(FSSpecHandler(fs))
    return ray.train.RunConfig(
        name=stage,
        storage_path=path,
        failure_config=ray.train.FailureConfig(max_failures=spec.scaling.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.storage.keep),
        **fs_args,
    )


def scaling_config(spec: JobSpec) -> ray.train.ScalingConfig:
    s = spec.scaling
    return ray.train.ScalingConfig(
        num_workers=s.num_workers,
        use_gpu=s.use_gpu,
        resources_per_worker=s.worker_resources(),
        placement_strategy=s.placement_strategy,
    )


def preflight(spec: JobSpec) -> None:
    """Fail in the driver, with the data layer's one-line message, on data the workers cannot split.

    Inside the workers the same error would be retried ``max_failures`` times as if a node had died.
    """
    for rank in range(spec.scaling.num_workers):
        spec_loader(spec, spec.data.train, train=True, rank=rank, world_size=spec.scaling.num_workers,
                    num_workers=spec.data.num_workers)


def run_stage(
    spec: JobSpec,
    stage: StageName,
    *,
    teacher_url: str,
    boundaries: list[int],
    out_url: str,
    init_url: str | None = None,
) -> dict[str, Any]:
    """Train ``stage`` on the connected Ray cluster; the student is exported to ``out_url``.

    Returns the metrics rank 0 reported last. Raises ``ray.train.TrainingFailedError`` when the
    workers failed more than ``max_failures`` times.
    """
    spec = absolute_paths(spec)
    preflight(spec)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "stage": stage,
            "teacher_url": absolute(teacher_url),
            "boundaries": list(boundaries),
            "init_url": None if init_url is None else absolute(init_url),
            "out_url": absolute(out_url),
        },
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
        scaling_config=scaling_config(spec),
        run_config=run_config(spec, stage),
    )
    log.info("%s: %d Ray Train workers, ZeRO-%d, effective batch %d, %d steps",
             stage, spec.scaling.num_workers, spec.deepspeed.zero_stage, spec.effective_batch,
             getattr(spec, stage).steps)
    result = trainer.fit()
    return dict(result.metrics or {})
