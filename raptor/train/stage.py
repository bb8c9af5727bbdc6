"""From the job spec to what one training stage needs: the core's StageConfig and a DeepSpeed config.

The spec speaks the user's language (``loss: token``, ``schedule: constant``, ``zero_stage``); the
core's :class:`~raptor.distill.StageConfig` and DeepSpeed speak theirs. The translation lives here,
once, so the Ray worker, the single-process benchmark and the tests build the same objects.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from raptor.config import JobSpec, Stage1Spec, Stage2Spec, TokenWeights
from raptor.distill import StageConfig

StageName = Literal["stage1", "stage2"]
STAGES: tuple[StageName, ...] = ("stage1", "stage2")


def _weights(w: TokenWeights | None) -> tuple[float, float, float] | None:
    return None if w is None else (w.cls, w.reg, w.patch)


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
        warmup_steps=s.warmup_steps,
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


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto`` means bf16 on GPU and fp32 on CPU (CPU bf16 matmuls are slower than fp32)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def deepspeed_config(spec: JobSpec, world_size: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config dict for the spec's ZeRO stage, precision, clipping and offload.

    ``train_batch_size`` = per-worker batch x world size x accumulation, so DeepSpeed checks the
    same effective batch the spec reports (``JobSpec.effective_batch`` at full scale).
    """
    ds = spec.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.data.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": spec.data.batch_size * world_size * ds.gradient_accumulation_steps,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # progress is ours (raptor.train.metrics), not DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if ds.precision == "fp16":
        cfg["fp16"] = {"enabled": True}
    elif use_bf16(ds.precision, device):
        cfg["bf16"] = {"enabled": True}
    if ds.offload_optimizer != "none":
        cfg["zero_force_ds_cpu_optimizer"] = False  # keep the torch AdamW the core builds
    return cfg


def single_device(spec: JobSpec) -> torch.device:
    """Where a single-process stage runs: the GPU of its Ray task with ``use_gpu``, else the CPU."""
    return torch.device("cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu")


def absolute(url: str) -> str:
    """A local path made absolute (Ray workers do not run in the driver's working directory)."""
    return url if "://" in url else os.path.abspath(url)


def absolute_paths(spec: JobSpec) -> JobSpec:
    """The spec with every local path (storage, data, teacher checkpoint) absolute."""
    raw = spec.model_dump(mode="json")
    for section, field in (("storage", "url"), ("data", "train"), ("data", "val"), ("teacher", "checkpoint")):
        if raw[section][field] is not None:
            raw[section][field] = absolute(raw[section][field])
    return JobSpec.model_validate(raw)
