"""Distillation: losses, schedules, one training step, single-process fit, fidelity."""

from raptor.distill.config import StageConfig
from raptor.distill.fidelity import METRICS, FidelityAccumulator, fidelity, summarize
from raptor.distill.fit import FitResult, fit, make_optimizer, train_step, trained_blocks
from raptor.distill.losses import (
    ar_loss,
    block_loss,
    distill_loss,
    stage1_loss,
    stage2_loss,
    tf_loss,
    token_loss,
)
from raptor.distill.schedules import lambda_at, lr_factor, lr_scheduler, stage_lambda

__all__ = [
    "METRICS",
    "FidelityAccumulator",
    "FitResult",
    "StageConfig",
    "ar_loss",
    "block_loss",
    "distill_loss",
    "fidelity",
    "fit",
    "lambda_at",
    "lr_factor",
    "lr_scheduler",
    "make_optimizer",
    "stage1_loss",
    "stage2_loss",
    "stage_lambda",
    "summarize",
    "tf_loss",
    "token_loss",
    "train_step",
    "trained_blocks",
]
