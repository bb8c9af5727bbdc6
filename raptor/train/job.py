"""What a Ray Train worker is told to do: a typed description of one distillation stage.

The service builds a :class:`StageJob` from the job spec (``raptor.service.build.stage_job``); the
runner never reads the spec. Every part is a frozen dataclass that travels into the workers as it
is (pickled by Ray), so a worker gets checked types, not a dict to re-validate by hand. The parts
that build library objects (:class:`TeacherRef`, :class:`ShardSource`) are also what the service's
single-process stages use, so a setting means the same thing in every process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from raptor import data
from raptor.distill import StageConfig
from raptor.errors import CorruptArtifact
from raptor.models import Teacher
from raptor.models.checkpoints import CheckpointError

StageName = Literal["stage1", "stage2"]
Precision = Literal["auto", "fp32", "bf16"]


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto`` means bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slower than fp32)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


@dataclass(frozen=True)
class TeacherRef:
    """Enough to build the frozen teacher in any process: a timm name, its overrides, a checkpoint URL."""

    name: str
    img_size: int
    checkpoint: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    precision: Precision = "auto"

    def load(self, device: torch.device | str = "cpu") -> Teacher:
        """The frozen teacher; a checkpoint that cannot be read or does not fit is a one-line error naming it."""
        try:
            teacher = Teacher.from_timm(self.name, img_size=self.img_size, checkpoint=self.checkpoint, **self.model_kwargs)
        except CheckpointError as e:
            raise CorruptArtifact(f"teacher checkpoint: {' '.join(str(e).split())}") from e
        return teacher.to(device)

    def amp(self, device: torch.device) -> torch.dtype | bool:
        """The autocast dtype of the teacher's forward passes on ``device`` (False: fp32)."""
        return torch.bfloat16 if use_bf16(self.precision, device) else False


@dataclass(frozen=True)
class ShardSource:
    """One split's shards and how to read them: the data settings every stage shares."""

    url: str
    batch_size: int
    image_size: int
    seed: int = 0
    num_workers: int = 0
    error_budget: float = 0.01
    crop_scale: tuple[float, float] = (0.08, 1.0)

    def loader(
        self,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int | None = None,
        batch_size: int | None = None,
        dense: bool = False,
    ) -> data.ShardLoader:
        """``train``: augmented, shuffled, the same number of whole batches on every rank.
        Otherwise: eval transform, every sample once in file order (one process), last batch kept."""
        return data.loader(
            self.url, batch_size=batch_size or self.batch_size, image_size=self.image_size, train=train,
            seed=self.seed, num_workers=self.num_workers if num_workers is None else num_workers, rank=rank,
            world_size=world_size, drop_last=train, error_budget=self.error_budget, crop_scale=self.crop_scale,
            dense=dense,
        )


@dataclass(frozen=True)
class StudentPlan:
    """The student a stage starts from: fresh blocks on ``boundaries`` (stage 1) or an export (stage 2)."""

    boundaries: tuple[int, ...]
    mlp: str = "swiglu"
    depth_scaling: bool = True
    init: str = "random"
    seed: int = 0
    init_url: str | None = None


@dataclass(frozen=True)
class ScalingPlan:
    """The worker group Ray Train starts, and how often it may restart it."""

    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    placement_strategy: str = "PACK"
    max_failures: int = 2


@dataclass(frozen=True)
class DeepSpeedPlan:
    """The DeepSpeed engine around the student's blocks."""

    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_clipping: float = 1.0
    gradient_accumulation_steps: int = 1
    activation_checkpointing: bool = False
    offload_optimizer: str = "none"
    offload_param: str = "none"

    def config(self, micro_batch: int, world_size: int, device: torch.device) -> dict[str, Any]:
        """The DeepSpeed config dict: ZeRO stage, precision, clipping, offload.

        ``train_batch_size`` = micro-batch x world size x accumulation, so DeepSpeed checks the same
        effective batch the job reports (:attr:`StageJob.effective_batch`).
        """
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.offload_optimizer != "none":
            zero["offload_optimizer"] = {"device": self.offload_optimizer}
        if self.offload_param != "none":
            zero["offload_param"] = {"device": self.offload_param}
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "train_batch_size": micro_batch * world_size * self.gradient_accumulation_steps,
            "gradient_clipping": self.gradient_clipping,
            "zero_optimization": zero,
            "steps_per_print": 10**9,  # progress is ours (raptor.train.metrics), not DeepSpeed's
            "wall_clock_breakdown": False,
        }
        if self.precision == "fp16":
            cfg["fp16"] = {"enabled": True}
        elif self.precision != "fp32" and use_bf16(self.precision, device):
            cfg["bf16"] = {"enabled": True}
        if self.offload_optimizer != "none":
            cfg["zero_force_ds_cpu_optimizer"] = False  # keep the torch AdamW the core builds
        return cfg


@dataclass(frozen=True)
class CheckpointPlan:
    """Where Ray Train keeps this stage's checkpoints: ``{folder}/checkpoints``, named by the stage's key.

    A resumed stage finds its checkpoints there; a stage with other inputs has another key, hence
    another folder, so it never continues a checkpoint made with other hyperparameters.
    """

    folder: str
    interval: int = 1000
    keep: int = 2


@dataclass(frozen=True)
class LogPlan:
    """What rank 0 reports: console progress every ``log_interval`` steps, fidelity every ``val_interval``, wandb."""

    run_id: str
    run_name: str
    log_interval: int = 50
    val_interval: int = 500
    wandb_project: str = "raptor"
    wandb_entity: str | None = None
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_dir: str = "wandb"
    wandb_group: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # what wandb records as the run's config


@dataclass(frozen=True)
class FaultPlan:
    """What the workers tolerate before they stop the stage with a resumable state."""

    storage_patience_s: float = 600.0  # an unreachable object store is retried this long (raptor.storage.retry)
    max_nonfinite_steps: int = 10  # optimizer steps in a row skipped for a NaN/Inf loss or gradient


@dataclass(frozen=True)
class StageJob:
    """One distillation stage for the runner: hyperparameters, models, data, resources, outputs."""

    stage: StageName
    config: StageConfig
    teacher: TeacherRef
    student: StudentPlan
    train: ShardSource
    val: ShardSource  # the fixed validation batch is its first eval-transformed batch
    scaling: ScalingPlan
    deepspeed: DeepSpeedPlan
    checkpoints: CheckpointPlan
    logging: LogPlan
    out_url: str  # the export: student.safetensors + manifest.json + history.json
    manifest: dict[str, Any] = field(default_factory=dict)  # provenance the export carries (key, inputs)
    faults: FaultPlan = field(default_factory=FaultPlan)

    @property
    def effective_batch(self) -> int:
        return self.train.batch_size * self.scaling.num_workers * self.deepspeed.gradient_accumulation_steps
