"""The runner's settings, declared once: the job spec's ``scaling``, ``logging``, ``student`` sections are
these models, ``teacher`` extends :class:`TeacherSettings`, ``storage`` :class:`StorageSettings` and each
training stage's section :class:`FaultSettings`; :class:`~raptor.train.job.StageJob` carries them into the Ray workers as they are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal, TypeVar

from pydantic import Field, model_validator

from raptor import storage
from raptor.errors import CorruptArtifact, UserError
from raptor.execution import Precision, autocast_dtype
from raptor.settings import Settings

if TYPE_CHECKING:  # the spec imports this module: `raptor --help` and `k8s render` must not load torch
    import torch

    from raptor.models import Teacher

S = TypeVar("S", bound=Settings)


def part(section: Settings, cls: type[S]) -> S:
    """The ``cls`` part of a spec section that extends ``cls``: what the runner takes, without the service's fields."""
    return cls.model_validate(section.model_dump(include=set(cls.model_fields)))


class TeacherSettings(Settings):
    """Enough to build the frozen teacher in any process: a timm name, its overrides, a checkpoint URL."""

    name: str = Field("vit_base_patch14_reg4_dinov2", description="timm model name of the teacher ViT; a DINOv2 name fixes its depth L")
    checkpoint: str | None = Field(None, description="local path or fsspec URL; .pth (official DINOv2), safetensors (timm/HF) or a raptor export")
    img_size: int = Field(224, gt=0, description="input resolution in pixels (224 for ViT-B/14: 16 x 16 patches)")
    precision: Precision = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="timm overrides, e.g. embed_dim, depth, num_heads")

    def load(self, device: torch.device | str = "cpu") -> Teacher:
        """The frozen teacher; a checkpoint that cannot be read or does not fit is a one-line error naming it."""
        from raptor.models import Teacher
        from raptor.models.checkpoints import CheckpointError

        try:
            teacher = Teacher.from_timm(self.name, img_size=self.img_size, checkpoint=self.checkpoint, **self.model_kwargs)
        except CheckpointError as e:
            raise CorruptArtifact(f"teacher checkpoint: {' '.join(str(e).split())}") from e
        return teacher.to(device)

    def amp(self, device: torch.device) -> torch.dtype | bool:
        """The autocast dtype of the teacher's forward passes on ``device`` (False: fp32)."""
        return autocast_dtype(self.precision, device)


class ScalingSettings(Settings):
    """The worker group Ray Train starts, what each worker reserves, and how often the group may restart."""

    num_workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel ranks; one per GPU on GPU clusters); "
                             "with min_workers, the most")
    min_workers: int | None = Field(
        None, gt=0, description="elastic training: the fewest workers a training stage runs on (Ray Train's elastic "
        "ScalingConfig, min_workers..num_workers): a lost node shrinks the group from the newest checkpoint instead of "
        "waiting for it, a node that joins grows it; needs data.global_batch_size (a count that does not divide it gives "
        "shares that differ by one sample, weighted so the gradient is the batch's mean); null = exactly num_workers")
    use_gpu: bool = Field(False, description="train on GPUs (NCCL) rather than CPUs (gloo)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker reserves (its data loading runs there)")
    gpus_per_worker: float = Field(1, ge=0, description="GPUs each worker reserves when use_gpu is true")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="extra Ray resources")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for the workers")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts after a failure (FailureConfig.max_failures); "
                              "-1 = unlimited")
    max_preemptions: int = Field(
        -1, ge=-1, description="worker-group restarts after a node was preempted (FailureConfig.max_preemption_failures), "
        "counted apart from max_failures; -1 = unlimited")
    resize_interval: float = Field(
        60, gt=0, description="elastic training: seconds between Ray Train's checks for nodes that joined (a larger "
        "group restarts from the newest checkpoint)")

    @model_validator(mode="after")
    def _range(self) -> "ScalingSettings":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"scaling.min_workers={self.min_workers} exceeds scaling.num_workers={self.num_workers} "
                             "(the most workers of the elastic range)")
        return self

    @property
    def world_sizes(self) -> range:
        """Every number of workers a training stage may run on: ``num_workers``, or min_workers..num_workers."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)

    def worker_resources(self) -> dict[str, float]:
        """Resources one Ray Train worker asks for."""
        res = {"CPU": self.cpus_per_worker, **self.resources_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res


def micro_batching(global_batch: int | None, world_size: int, micro_batch: int, accumulation: int = 1) -> tuple[int, int]:
    """(micro-batch per worker, micro-batches per optimizer step) at ``world_size`` workers.

    With a ``global_batch`` (``data.global_batch_size``) every optimizer step sees that many samples at
    any world size: each worker's share (``global_batch / world_size``, one more on some workers where
    that does not divide) in the fewest micro-batches of at most ``micro_batch`` (``data.batch_size``,
    a ceiling then); the micro-batch returned is the largest. Without one, the batch is ``micro_batch``
    per worker and ``accumulation`` micro-batches per step, so the optimizer's batch grows with the workers.
    """
    if global_batch is None:
        return micro_batch, accumulation
    if global_batch < world_size:
        raise UserError(f"data.global_batch_size={global_batch} leaves some of {world_size} workers without a sample "
                        f"(scaling.num_workers): use at least {world_size}")
    share = -(-global_batch // world_size)
    steps = -(-share // micro_batch)
    return -(-share // steps), steps


def worker_layout(sizes: range, batching: Callable[[int], tuple[int, int]], global_batch: int | None = None) -> str:
    """``2 Ray Train workers, effective batch 64 (micro-batch 32 x 1 accumulated x 2)``; for an elastic range
    the batching at its fewest and most workers (``micro-batch up to``: shares that differ by a sample)."""
    def batch(n: int) -> str:
        micro, accumulation = batching(n)
        total = global_batch or micro * accumulation * n
        up_to = "up to " if micro * accumulation * n != total else ""
        return f"effective batch {total} (micro-batch {up_to}{micro} x {accumulation} accumulated x {n})"

    if len(sizes) == 1:
        return f"{sizes[0]} Ray Train worker{'' if sizes[0] == 1 else 's'}, {batch(sizes[0])}"
    return f"{sizes[0]}-{sizes[-1]} Ray Train workers (elastic), {batch(sizes[0])} to {batch(sizes[-1])}"


class StudentSettings(Settings):
    """Architecture of the k student blocks: fixed for both stages, so it lives outside them."""

    mlp: Literal["swiglu", "gelu"] = Field("swiglu", description="block MLP: swiglu (D -> 2 x 4D, silu(a) * b, -> D) or gelu")
    depth_scaling: bool = Field(True, description="(g1, g2, g3) = 1 + MLP_t(t) for the layer index t: a non-autonomous block")
    init: Literal["random", "teacher"] = Field("random", description="initial block weights: random or from the teacher's layers")


class StorageSettings(Settings):
    """How the workers keep checkpoints and wait for an unreachable object store."""

    checkpoint_interval: int = Field(1000, gt=0, description="steps between checkpoints")
    keep: int = Field(2, gt=0, description="checkpoints kept per stage")
    upload: Literal["async", "sync"] = Field(
        "async", description="periodic checkpoints: async = training goes on while they upload (Ray Train's "
        "CheckpointUploadMode.ASYNC), sync = the step waits; a checkpoint before a preemption always waits")
    preemption_check: int = Field(
        1, gt=0, description="steps between checks for a preemption notice (ray.train.get_preemption_info, a "
        "collective); a notice brings a checkpoint at the next check")
    patience: float = Field(
        storage.DEFAULT_PATIENCE_S, gt=0, le=86_400, description="seconds an unreachable object store is retried (with backoff) before "
        "the run stops, resumable; checkpoint, artifact and index writes and reads wait this long")


class FaultSettings(Settings):
    """What a training stage tolerates before it stops with a resumable state."""

    max_nonfinite_steps: int = Field(
        10, ge=0, description="optimizer steps in a row that may be skipped for a NaN/Inf loss or gradient; one more "
        "stops the stage with a checkpoint (a diverged stage is never exported)")


class LoggingSettings(Settings):
    """What rank 0 reports: console progress, fidelity on the fixed validation batch, wandb."""

    wandb_project: str = Field("raptor", description="wandb project")
    wandb_entity: str | None = Field(None, description="wandb team or user; null = the key's default")
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = Field("auto", description="auto = online if WANDB_API_KEY is set, else offline")
    wandb_group: str | None = Field(None, description="wandb group of the stages' runs; null = the job's name (a sweep groups its trials under its own name)")
    log_interval: int = Field(50, gt=0, description="steps between metric logs (console and wandb)")
    val_interval: int = Field(500, gt=0, description="steps between fidelity checks on the fixed validation batch")
    peak_tflops: float | None = Field(
        None, gt=0, description="device peak TFLOP/s for the logged MFU; null = the GPU's dense peak from raptor.perf's "
        "table (bf16 or fp32 as the step runs); no MFU on CPU unless set")
