"""From the job spec to what the libraries and the runner take: the one place a spec field is translated.

The teacher (:class:`~raptor.train.settings.TeacherSettings`), each split's shards
(:class:`~raptor.train.job.ShardSource`), a stage's hyperparameters (the core's
:class:`~raptor.distill.StageConfig`) and a whole distillation stage for the Ray workers
(:class:`~raptor.train.job.StageJob`) are built here, so one setting (image size, seed, crop scale,
precision, warm-up) means the same thing in teacher training, discovery, the workers, the probe and
the report.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Literal

import torch

from raptor import storage
from raptor.distill import StageConfig
from raptor.service.engine.artifacts import RunFolder
from raptor.service.spec import JobSpec, SpecError, Stage1Spec, Stage2Spec, TokenWeights
from raptor.data.settings import LoaderSettings
from raptor.train.job import RunLabels, ShardSource, StageJob, StageName
from raptor.train.settings import FaultSettings, StorageSettings, TeacherSettings, part


def absolute(url: str) -> str:
    """A local path made absolute (Ray workers do not run in the driver's working directory)."""
    return url if "://" in url else os.path.abspath(url)


def absolute_paths(spec: JobSpec) -> JobSpec:
    """The spec with every local path (storage, data, teacher checkpoint) absolute."""
    raw = spec.model_dump(mode="json")
    for section, name in (("storage", "url"), ("storage", "store"), ("data", "train"), ("data", "val"),
                          ("teacher", "checkpoint")):
        if raw[section][name] is not None:
            raw[section][name] = absolute(raw[section][name])
    return JobSpec.model_validate(raw)


def check_teacher(spec: JobSpec) -> None:
    """Build the spec's teacher architecture on the meta device (no memory, no weights): a model name
    timm does not know or ``model_kwargs`` it cannot take fail here, in one line, before any stage runs."""
    from raptor.models import Teacher

    t = spec.teacher
    try:
        with torch.device("meta"):
            Teacher.from_timm(t.name, img_size=t.img_size, **t.model_kwargs)
    except Exception as e:  # timm's constructors check their arguments with any exception type (even 0-division)
        fields = [f"teacher.name={t.name!r}", f"teacher.img_size={t.img_size}",
                  *(f"teacher.model_kwargs.{k}={v!r}" for k, v in t.model_kwargs.items())]
        raise SpecError(f"{', '.join(fields)}: timm cannot build this teacher "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def teacher_ref(spec: JobSpec, run_folder: RunFolder) -> TeacherSettings:
    """The teacher the stages load: the spec's settings with the checkpoint this run trained or was given."""
    return part(spec.teacher, TeacherSettings).updated(checkpoint=run_folder.teacher)


def shard_source(
    spec: JobSpec, split: Literal["train", "val"], *, num_workers: int | None = None, seed: int | None = None,
    augment: bool = True,
) -> ShardSource:
    """The ``train`` or ``val`` shards with the spec's data settings (layout split, seed, error budget,
    crop scale, image size, labels, decoding). ``val`` falls back to the training shards when the spec
    has no validation split; it is read by one process unless ``num_workers`` says otherwise.
    ``augment=False``: training batches get the eval transform (centre crop), still shuffled."""
    d = spec.data
    if split == "val" and d.val is None:
        split = "train"
        num_workers = 0 if num_workers is None else num_workers
    train = split == "train"
    settings = part(d, LoaderSettings).updated(
        seed=d.seed if seed is None else seed, num_workers=d.num_workers if num_workers is None else num_workers)
    return ShardSource(url=d.train if train else d.val, image_size=spec.teacher.img_size, settings=settings,
                       split=d.train_split if train else d.val_split, samples=d.train_samples if train else None,
                       augment=augment)


def distill_source(spec: JobSpec) -> ShardSource:
    """The distillation stages' training shards, with ``data.distill_transform`` (augmented or centre crops)."""
    return shard_source(spec, "train", augment=spec.data.distill_transform == "augment")


def _weights(w: TokenWeights | None) -> tuple[float, float, float] | None:
    return None if w is None else w.as_tuple()


def stage_config(spec: JobSpec, stage: StageName) -> StageConfig:
    """The core's StageConfig for ``stage`` of ``spec``.

    ``loss: token`` is the token-group weighted MSE, ``mse`` plain MSE over all tokens;
    ``schedule: constant`` holds the peak LR after warm-up (cosine floor = peak). Clipping is
    DeepSpeed's (``deepspeed.gradient_clipping``), so the engine and the bare step agree.
    """
    s: Stage1Spec | Stage2Spec = getattr(spec, stage)
    cfg: dict[str, Any] = dict(
        stage=1 if stage == "stage1" else 2,
        steps=s.steps,
        lr=s.lr,
        min_lr=s.lr if s.schedule == "constant" else s.min_lr,
        warmup_steps=s.warmup,
        weight_decay=s.weight_decay,
        grad_clip=spec.deepspeed.gradient_clipping or None,
        sigma=s.sigma,
        loss="cosine" if s.loss == "cosine" else "mse",
        token_weights=_weights(s.token_weights) if s.loss == "token" else None,
    )
    if isinstance(s, Stage1Spec):
        cfg.update(
            lambda_schedule=s.lambda_schedule,
            lambda_min=s.lambda_min,
            lambda_rho=s.lambda_rho,
            horizon=s.horizon,
            last_block_token_weights=_weights(s.last_block_token_weights),
        )
    return StageConfig(**cfg)


def wandb_dir(spec: JobSpec) -> str:
    """Offline wandb runs go beside a local run; for object storage, to $WANDB_DIR or a temp folder."""
    if storage.scheme(spec.storage.url) == "file":
        return os.path.join(spec.storage.url, "wandb")
    return os.environ.get("WANDB_DIR") or os.path.join("/tmp", "raptor-wandb")


def stage_job(
    spec: JobSpec, stage: StageName, run_folder: RunFolder, key: str, inputs: dict[str, Any], *, report_interval: int | None = None
) -> StageJob:
    """Stage 1 or 2 of ``spec`` for the Ray workers: everything they need, typed, nothing they must look up.

    ``report_interval``: steps between metric reports to Ray Train while the stage trains (a sweep
    trial's scheduler reads them); stage 2's steps are counted on from stage 1's.
    """
    return StageJob(
        stage=stage,
        config=stage_config(spec, stage),
        teacher=teacher_ref(spec, run_folder),
        student=spec.student,
        boundaries=tuple(run_folder.boundaries()),
        init_url=run_folder.student("stage1") if stage == "stage2" else None,
        train=distill_source(spec),
        val=shard_source(spec, "val", num_workers=0),
        scaling=spec.scaling,
        deepspeed=spec.deepspeed,
        storage=part(spec.storage, StorageSettings),
        faults=part(getattr(spec, stage), FaultSettings),
        logging=spec.logging.updated(wandb_group=spec.logging.wandb_group or spec.name),
        labels=RunLabels(
            run_id=f"{stage}-{key}", run_name=f"{spec.name}-{stage}", wandb_dir=wandb_dir(spec),
            wandb_config={"stage": stage, "key": key, "inputs": inputs, "run": spec.name},
            report_interval=report_interval, step_offset=spec.stage1.steps if stage == "stage2" else 0,
        ),
        out_url=run_folder.folder(stage),
        manifest={"run": spec.name, "key": key, "inputs": inputs},
        global_batch=spec.data.global_batch_size,
    )


def single_device(spec: JobSpec) -> torch.device:
    """Where a single-process stage runs: the GPU of its Ray task with ``use_gpu``, else the CPU."""
    return torch.device("cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu")


def single_process(spec: JobSpec, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in the driver (CPU) or as a Ray task on one GPU worker (``use_gpu``).

    On CPU the driver takes one worker's share of threads (``scaling.cpus_per_worker``):
    oversubscribed BLAS threads are many times slower on a busy machine. With ``use_gpu`` a driver
    on a CPU-only head node still has the GPUs do the work.
    """
    sc = spec.scaling
    if not sc.use_gpu:
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(sc.cpus_per_worker)))
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    import ray

    task = ray.remote(num_cpus=sc.cpus_per_worker, num_gpus=1)(_recorded)
    result, written = ray.get(task.remote(fn, *args, **kwargs))
    storage.record(written)  # the checksums of what the task wrote, for the stage's stage.json
    return result


def _recorded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, dict[str, str]]:
    """``fn``'s result and the checksums of the files it wrote (in a Ray task, another process)."""
    with storage.recording() as written:
        result = fn(*args, **kwargs)
    return result, written
