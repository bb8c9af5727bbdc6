"""What a Ray Train worker is told to do: a typed description of one distillation stage.

The service builds a :class:`StageJob` from the job spec (``raptor.service.spec.translate.stage_job``);
the runner never reads the spec. Every part travels into the workers as it is (pickled by Ray), so a
worker gets checked types, not a dict to re-validate by hand. Its settings are the models the spec's
sections are made of (:mod:`raptor.train.settings`, :mod:`raptor.execution`,
:mod:`raptor.data.settings`), so a setting is declared once; the parts that build library objects
(the teacher's settings, :class:`ShardSource`) are also what the service's single-process stages
use, so a setting means the same thing in every process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from raptor import data
from raptor.data.settings import LoaderSettings
from raptor.distill import StageConfig
from raptor.execution import DeepSpeedSettings
from raptor.train.settings import (
    FaultSettings,
    LoggingSettings,
    ScalingSettings,
    StorageSettings,
    StudentSettings,
    TeacherSettings,
    micro_batching,
)

StageName = Literal["stage1", "stage2"]


@dataclass(frozen=True)
class ShardSource:
    """One split's shards and how to read them: the loader's settings every stage shares, the split's
    own URL, layout split and sample count, and whether training batches are augmented."""

    url: str
    image_size: int
    settings: LoaderSettings
    split: str | None = None  # a timm dataset's split, or a tar set in a folder
    samples: int | None = None  # the total where no info file gives it
    augment: bool = True  # False: training batches get the eval transform (centre crop), still shuffled

    def loader(
        self,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
        global_batch: int | None = None,
        order_world_size: int | None = None,
        dense: bool = False,
        device: torch.device | None = None,
    ) -> data.ShardLoader:
        """``train``: shuffled, augmented unless ``augment`` is off, the same number of whole batches of
        ``batch_size`` on every rank, ``global_batch`` samples a step over all ranks in the order laid
        out for ``order_world_size`` (:func:`raptor.data.streaming.loader`), decoded where ``decode`` says and delivered normalised on
        ``device`` (the CPU by default). Otherwise: eval transform, every sample once in file order
        (one process), last batch kept."""
        gpu = train and self.settings.decode == "gpu" and not dense
        settings = self.settings.updated(batch_size=batch_size or self.settings.batch_size,
                                         decode="gpu" if gpu else "cpu")
        return data.loader(
            self.url, settings, image_size=self.image_size, rank=rank, world_size=world_size, device=device,
            global_batch=global_batch, order_world_size=order_world_size,
            train=train and self.augment, shuffle=train, drop_last=train, dense=dense, split=self.split,
            samples=self.samples, pin_memory=device is not None and device.type == "cuda",
        )


@dataclass(frozen=True)
class RunLabels:
    """What names a stage's run and where its reports count from: derived per stage, not settings.

    A sweep's scheduler (Ray Tune's ASHA) needs metrics while a stage trains, not only at checkpoints:
    every ``report_interval`` steps the workers report them to Ray Train (forwarded to Tune), with
    ``global_step`` = ``step_offset`` + the stage's step, so a trial's steps rise across stage 1 and 2.
    """

    run_id: str
    run_name: str
    wandb_dir: str
    wandb_config: dict[str, Any] = field(default_factory=dict)  # what wandb records as the run's config
    report_interval: int | None = None
    step_offset: int = 0


@dataclass(frozen=True)
class StageJob:
    """One distillation stage for the runner: hyperparameters, models, data, resources, outputs."""

    stage: StageName
    config: StageConfig
    teacher: TeacherSettings
    student: StudentSettings
    boundaries: tuple[int, ...]  # stage 1: fresh blocks on these segments
    init_url: str | None  # stage 2: the export of stage 1 it chains
    train: ShardSource
    val: ShardSource  # the fixed validation batch is its first eval-transformed batch
    scaling: ScalingSettings
    deepspeed: DeepSpeedSettings
    storage: StorageSettings
    faults: FaultSettings
    logging: LoggingSettings
    labels: RunLabels
    out_url: str  # the export (student.safetensors + manifest.json + history.json) and checkpoints/
    manifest: dict[str, Any] = field(default_factory=dict)  # provenance the export carries (key, inputs)
    global_batch: int | None = None  # samples per optimizer step at any world size; None: grows with the workers

    def batching(self, world_size: int) -> tuple[int, int]:
        """(micro-batch per worker, micro-batches per optimizer step) at ``world_size`` workers."""
        return micro_batching(self.global_batch, world_size, self.train.settings.batch_size,
                              self.deepspeed.gradient_accumulation_steps)

    def train_loader(self, rank: int, world_size: int, device: torch.device | None = None) -> data.ShardLoader:
        """This rank's training batches at ``world_size``: micro-batches of :meth:`batching` out of global
        batches in one order (:mod:`raptor.data.streaming`). With a fixed global batch the order is laid
        out for the world size that needs no accumulation, the same at every world size; without one
        for this world size, which the stage's key holds."""
        micro, accumulation = self.batching(world_size)
        batch = self.global_batch or micro * accumulation * world_size
        order = world_size if self.global_batch is None else max(batch // self.train.settings.batch_size, 1)
        return self.train.loader(train=True, rank=rank, world_size=world_size, batch_size=micro, global_batch=batch,
                                 order_world_size=order, device=device)

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step over all workers, at ``scaling.num_workers``."""
        micro, steps = self.batching(self.scaling.num_workers)
        return self.global_batch or micro * steps * self.scaling.num_workers
