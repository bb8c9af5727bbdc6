"""What a Ray Train worker is told to do: a typed description of one distillation stage.

The service builds a :class:`StageJob` from the job spec (``raptor.service.spec.translate.stage_job``); the
runner never reads the spec. Every part is a frozen dataclass that travels into the workers as it
is (pickled by Ray), so a worker gets checked types, not a dict to re-validate by hand. The parts
that build library objects (:class:`TeacherRef`, :class:`ShardSource`) are also what the service's
single-process stages use, so a setting means the same thing in every process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from raptor import data, storage
from raptor.distill import StageConfig
from raptor.errors import CorruptArtifact
from raptor.models import Teacher
from raptor.models.checkpoints import CheckpointError

StageName = Literal["stage1", "stage2"]
Precision = Literal["auto", "fp32", "bf16"]
CompileMode = Literal["auto", "off", "loss", "blocks"]

DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce/allgather bucket (elements)


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto`` means bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slower than fp32)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | bool:
    """The ``torch.autocast`` dtype of ``precision`` on ``device`` (False: fp32, no autocast)."""
    return torch.bfloat16 if use_bf16(precision, device) else False


def bucket_elems(student_params: int) -> int:
    """DeepSpeed's reduce and all-gather buckets sized to the student: all of its gradients (at most
    DeepSpeed's default). The default 5e8 elements allocate 2 GB per GPU at ZeRO >= 1 for a student
    of 10-100M parameters; one bucket of the student's size reduces its gradients in one collective."""
    return max(1, min(DEEPSPEED_BUCKET, int(student_params)))


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
        return autocast_dtype(self.precision, device)


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
    split: str | None = None  # a timm dataset's split, or a tar set in a folder
    samples: int | None = None  # the total where no info file gives it
    num_classes: int | None = None
    label_key: str = "cls"
    decode: Literal["cpu", "gpu"] = "cpu"  # where training batches are decoded
    augment: bool = True  # False: training batches get the eval transform (centre crop), still shuffled

    def loader(
        self,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int | None = None,
        batch_size: int | None = None,
        dense: bool = False,
        device: torch.device | None = None,
    ) -> data.ShardLoader:
        """``train``: shuffled, augmented unless ``augment`` is off, the same number of whole batches on
        every rank, decoded where ``decode`` says and delivered normalised on ``device`` (the CPU by
        default). Otherwise: eval transform, every sample once in file order (one process), last batch kept."""
        gpu = train and self.decode == "gpu" and not dense
        return data.loader(
            self.url, batch_size=batch_size or self.batch_size, image_size=self.image_size,
            train=train and self.augment, shuffle=train, seed=self.seed,
            num_workers=self.num_workers if num_workers is None else num_workers, rank=rank, world_size=world_size,
            drop_last=train, error_budget=self.error_budget, crop_scale=self.crop_scale, dense=dense,
            split=self.split, samples=self.samples, num_classes=self.num_classes,
            label_key=self.label_key, decode="gpu" if gpu else "cpu", device=device,
            pin_memory=device is not None and device.type == "cuda",
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
    """The DeepSpeed engine around the student's blocks, and the hot path inside it.

    The engine is always fp32 (fp32 parameters, gradients, master weights and export): mixed
    precision is ``torch.autocast`` around the forward (``precision``), which computes matmuls and
    attention in bf16 while the residual stream, norms, depth-scaling gains and loss stay fp32.
    DeepSpeed's own bf16 mode would hold the student (and the rollout's state) in bf16, which
    costs fidelity (issue 11: update-R^2 0.81 against 0.90).
    """

    zero_stage: int = 2
    precision: Precision = "auto"
    gradient_clipping: float = 1.0
    gradient_accumulation_steps: int = 1
    activation_checkpointing: bool | tuple[int, ...] = False  # every block, or these block indices
    offload_optimizer: str = "none"
    offload_param: str = "none"
    compile: CompileMode = "auto"

    def amp(self, device: torch.device) -> torch.dtype | bool:
        """The autocast dtype of the student's forward on ``device`` (False: fp32)."""
        return autocast_dtype(self.precision, device)

    def compile_mode(self, device: torch.device) -> Literal["off", "loss", "blocks"]:
        """``auto``: the whole stage loss and the teacher's trajectory compiled on GPU with ZeRO <= 2;
        eager on CPU (inductor's compile time outweighs its gain at CPU sizes) and under ZeRO-3
        (its parameter-gathering hooks break the graph)."""
        if self.compile != "auto":
            return self.compile
        return "loss" if device.type == "cuda" and self.zero_stage <= 2 else "off"

    def fused_adamw(self, device: torch.device) -> bool:
        """torch's single-kernel AdamW on GPU; not with the optimizer offloaded (it steps on CPU)."""
        return device.type == "cuda" and self.offload_optimizer == "none"

    def config(self, micro_batch: int, world_size: int, student_params: int) -> dict[str, Any]:
        """The DeepSpeed config dict: ZeRO stage, clipping, offload, buckets sized to the student.

        ``train_batch_size`` = micro-batch x world size x accumulation, so DeepSpeed checks the same
        effective batch the job reports (:attr:`StageJob.effective_batch`). No ``bf16``/``fp16``
        section: the engine stays fp32 (see the class docstring).
        """
        bucket = bucket_elems(student_params)
        zero: dict[str, Any] = {"stage": self.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
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
    peak_tflops: float | None = None  # the device's peak for MFU; None = the table's (GPU) or no MFU (CPU)
    config: dict[str, Any] = field(default_factory=dict)  # what wandb records as the run's config
    # a sweep's scheduler (Ray Tune's ASHA) needs metrics while a stage trains, not only at checkpoints:
    # every ``report_interval`` steps the workers report them to Ray Train (forwarded to Tune), with
    # ``global_step`` = ``step_offset`` + the stage's step, so a trial's steps rise across stage 1 and 2
    report_interval: int | None = None
    step_offset: int = 0


@dataclass(frozen=True)
class FaultPlan:
    """What the workers tolerate before they stop the stage with a resumable state."""

    storage_patience_s: float = storage.DEFAULT_PATIENCE_S  # an unreachable object store is retried this long (raptor.storage.retry)
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
