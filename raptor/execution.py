"""How the student's training step executes: DeepSpeed ZeRO, precision, activation checkpointing, offload, compile.

:class:`DeepSpeedSettings` is declared once and read by the runner (it builds the DeepSpeed engine
and the hot path from it), by the memory plan (:mod:`raptor.perf.memory` sizes exactly that
configuration) and by the job spec (its ``deepspeed`` section is this model).

The engine is always fp32 (fp32 parameters, gradients, master weights and export): mixed precision
is ``torch.autocast`` around the forward (``precision``), which computes matmuls and attention in
bf16 while the residual stream, norms, depth-scaling gains and loss stay fp32. DeepSpeed's own bf16
mode would hold the student (and the rollout's state) in bf16, which costs fidelity (update-R^2:
see docs/performance.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from raptor.settings import Settings

if TYPE_CHECKING:  # the spec imports this module: `raptor --help` and `k8s render` must not load torch
    import torch

Precision = Literal["auto", "fp32", "bf16"]
CompileMode = Literal["auto", "off", "loss", "blocks"]

DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce/allgather bucket (elements)


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto`` means bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slower than fp32)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | bool:
    """The ``torch.autocast`` dtype of ``precision`` on ``device`` (False: fp32, no autocast)."""
    import torch

    return torch.bfloat16 if use_bf16(precision, device) else False


def bucket_elems(student_params: int) -> int:
    """DeepSpeed's reduce and all-gather buckets sized to the student: all of its gradients (at most
    DeepSpeed's default). The default 5e8 elements allocate 2 GB per GPU at ZeRO >= 1 for a student
    of 10-100M parameters; one bucket of the student's size reduces its gradients in one collective."""
    return max(1, min(DEEPSPEED_BUCKET, int(student_params)))


class DeepSpeedSettings(Settings):
    """The student's training engine (always fp32 in DeepSpeed: mixed precision is autocast) and its hot path."""

    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage: 0 none, 1 shards optimizer states, 2 also gradients, 3 also parameters")
    precision: Precision = Field(
        "auto", description="student step: bf16 = bf16 autocast matmuls with fp32 weights, residual stream, gains, loss, "
        "optimizer and export; auto = bf16 on GPU, fp32 on CPU")
    gradient_clipping: float = Field(1.0, ge=0, description="global gradient-norm clip (0 = off)")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    activation_checkpointing: bool | list[int] = Field(
        False, description="recompute block applications in backward to save memory: true = every block, "
        "a list = those blocks (0-based; `raptor plan` says which fit)")
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field("none", description="optimizer states to cpu or nvme (ZeRO >= 1)")
    offload_param: Literal["none", "cpu", "nvme"] = Field("none", description="parameters to cpu or nvme (ZeRO-3 only)")
    compile: CompileMode = Field(
        "auto", description="torch.compile of the hot path: loss = teacher trajectory and whole stage loss, blocks = each "
        "block (compile time independent of depth), off = eager; auto = loss on GPU with ZeRO <= 2, else off")

    @field_validator("activation_checkpointing")
    @classmethod
    def _blocks(cls, v: bool | list[int]) -> bool | list[int]:
        if isinstance(v, list) and (any(b < 0 for b in v) or len(set(v)) != len(v)):
            raise ValueError(f"activation_checkpointing blocks must be distinct indices >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _offload(self) -> "DeepSpeedSettings":
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_param needs zero_stage 3 (got zero_stage={self.zero_stage})")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.compile in ("loss", "blocks") and self.zero_stage == 3:
            raise ValueError(f"compile={self.compile} needs zero_stage <= 2 (ZeRO-3's parameter gathering breaks the graph)")
        return self

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

    def config(self, micro_batch: int, world_size: int, student_params: int, accumulation: int | None = None) -> dict[str, Any]:
        """The DeepSpeed config dict: ZeRO stage, clipping, offload, buckets sized to the student.

        ``train_batch_size`` = micro-batch x world size x accumulation (``accumulation``, else
        ``gradient_accumulation_steps``), so DeepSpeed checks the same effective batch the job
        reports. No ``bf16``/``fp16`` section: the engine stays fp32.
        """
        accumulation = self.gradient_accumulation_steps if accumulation is None else accumulation
        bucket = bucket_elems(student_params)
        zero: dict[str, Any] = {"stage": self.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
        if self.offload_optimizer != "none":
            zero["offload_optimizer"] = {"device": self.offload_optimizer}
        if self.offload_param != "none":
            zero["offload_param"] = {"device": self.offload_param}
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro_batch * world_size * accumulation,
            "gradient_clipping": self.gradient_clipping,
            "zero_optimization": zero,
            "steps_per_print": 10**9,  # progress is ours (raptor.train.metrics), not DeepSpeed's
            "wall_clock_breakdown": False,
        }
        if self.offload_optimizer != "none":
            cfg["zero_force_ds_cpu_optimizer"] = False  # keep the torch AdamW the core builds
        return cfg
